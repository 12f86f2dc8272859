"""Solvers in sequence: each stage's solver runs its `iterations`, the last stage the rest of the run.

    solver:
      _target_: infalign.trainer.solvers.stages.Stages
      stages:
        - {iterations: 15, solver: {_target_: infalign.trainer.solvers.distill.Distill, ...}}
        - {iterations: null, solver: {_target_: infalign.trainer.solvers.exact.ExactKL, ...}}

conf/solver/distill_rl.yaml: distil the tilt, then exact-KL RL from the distilled policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from infalign.trainer.solvers.base import Experience, Solver

__all__ = ["Stages"]


class Stages(Solver):
    def __init__(self, stages: Sequence[Mapping]):
        if not stages:
            raise ValueError("solver.stages: give at least one stage ({iterations, solver})")
        self.solvers = [s["solver"] for s in stages]
        counts = [s.get("iterations") for s in stages]
        if any(c is None or int(c) < 0 for c in counts[:-1]):
            raise ValueError(f"solver.stages: every stage but the last needs iterations >= 0, got {counts}")
        # the iteration each stage starts at; the last stage runs to the end of the run
        self.starts = [sum(int(c) for c in counts[:i]) for i in range(len(counts))]

    def at(self, iteration: int) -> Solver:
        return next(s for start, s in reversed(list(zip(self.starts, self.solvers))) if iteration >= start)

    def experience(self, iteration: int) -> Experience:
        return self.at(iteration).experience(iteration)

    def step(self, module, buffer) -> dict[str, float]:
        return self.at(buffer.iteration).step(module, buffer)

    def end_iteration(self, stats, sequences: int, iteration: int) -> None:
        self.at(iteration).end_iteration(stats, sequences, iteration)

    def steps_at(self, iteration: int) -> int:
        return self.at(iteration).steps_at(iteration)

    def check(self, world: int) -> None:
        for s in self.solvers:
            s.check(world)

    def state_dict(self) -> dict:
        """The stages' states side by side in the checkpoint (one stateful stage of a kind: its keys are its own)."""
        states = [s.state_dict() for s in self.solvers]
        keys = [k for state in states for k in state]
        if len(keys) != len(set(keys)):
            raise ValueError(f"solver.stages: two stages keep state under the same checkpoint keys {sorted(keys)}")
        return {k: v for state in states for k, v in state.items()}

    def load_state_dict(self, state: Mapping) -> None:
        for s in self.solvers:
            s.load_state_dict(state)
