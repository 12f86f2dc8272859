"""Solvers: how an iteration's experience becomes optimizer steps (`Solver`, docs/solvers.md). One file each:
`rloo` (RLOO / PPO-clip), `exact` (RLOO with the exact KL), `distill` (maximum likelihood on the pool drawn by
weight), `stages` (solvers in sequence), `maxk` (the best-/worst-of-N win rate's own gradient).
conf/solver/*.yaml choose one through `solver._target_`."""

from __future__ import annotations

from infalign.trainer.solvers.base import Experience, Solver
from infalign.trainer.solvers.distill import Distill
from infalign.trainer.solvers.exact import ExactKL
from infalign.trainer.solvers.maxk import MaxK
from infalign.trainer.solvers.rloo import RLOO
from infalign.trainer.solvers.stages import Stages

__all__ = ["RLOO", "Distill", "ExactKL", "Experience", "MaxK", "Solver", "Stages", "policy_gradient"]


def policy_gradient(*, kl_penalty: str = "reward", **kwargs) -> RLOO:
    """conf/solver/rloo.yaml's solver: RLOO (rl.algo=ppo: PPO-clip), with rl.kl_penalty=exact the exact-KL one."""
    if kl_penalty not in ("reward", "exact"):
        raise ValueError(f"rl.kl_penalty must be 'reward' or 'exact', got {kl_penalty!r}")
    return (ExactKL if kl_penalty == "exact" else RLOO)(**kwargs)
