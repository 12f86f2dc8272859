"""Transforms whose parameters the theory solves for, built explicitly (the `_target_`s of conf/transform/).

- `bon_exp` / `won_exp` with `t="auto"`: the `t` that maximises the best-/worst-of-N win rate for the run's
  N at a target KL (`target_kl`, else the KL the inference-aware optimum spends at `beta`), by `best_t`;
  a number is used as it is, with no solver.
- `optimal`: the optimal transform's table for (N, mode, beta), by the damped fixed-point iteration.

The solver work (about a second each) happens here, visibly, not inside a transform's constructor.
"""

from __future__ import annotations

import math

from infalign.core.checks import check_beta, check_n
from infalign.core.transforms import BoNExpTransform, OptimalTransform, WoNExpTransform
from infalign.theory.solve import best_t, optimal_density, optimal_transform

__all__ = ["auto_t", "bon_exp", "optimal", "won_exp"]


def auto_t(mode: str, n, beta, target_kl=None, owner: str = "transform") -> float:
    """The theory's best `t` of the exp family for best-/worst-of-N (`mode` "bon"/"won") at a target KL.

    The target KL defaults to the KL of the optimal policy for (N, mode, beta): the exp-family member that
    is best at the KL the inference-aware optimum itself spends at this beta.
    """
    if n is None or (beta is None and target_kl is None):
        raise ValueError(f"{owner}: t=auto needs n and beta (or target_kl) to choose t; they default to the run's")
    if target_kl is None:
        target_kl = optimal_density(check_n(n), mode, check_beta(beta)).kl()
    else:
        try:
            target_kl = float(target_kl)
        except (TypeError, ValueError):
            target_kl = math.nan
        if not (math.isfinite(target_kl) and target_kl > 0):
            raise ValueError(f"{owner}: `target_kl` must be a positive finite number (nats) or null, got "
                             f"{target_kl!r} (e.g. transform.target_kl=0.5)")
    return best_t(mode, n, target_kl)["t"]


def bon_exp(t: float | str = "auto", n: int | None = None, beta: float | None = None,
            target_kl: float | None = None) -> BoNExpTransform:
    """`BoNExpTransform`, with `t="auto"` chosen for best-of-`n` (see `auto_t`)."""
    if t == "auto":
        return BoNExpTransform(auto_t("bon", n, beta, target_kl, "bon_exp"), auto=True)
    return BoNExpTransform(t)


def won_exp(t: float | str = "auto", n: int | None = None, beta: float | None = None,
            target_kl: float | None = None) -> WoNExpTransform:
    """`WoNExpTransform`, with `t="auto"` chosen for worst-of-`n` (see `auto_t`)."""
    if t == "auto":
        return WoNExpTransform(auto_t("won", n, beta, target_kl, "won_exp"), auto=True)
    return WoNExpTransform(t)


def optimal(n: int = 4, mode: str = "bon", beta: float = 0.1) -> OptimalTransform:
    """The optimal transform for (N, mode, beta), tabulated by the theory."""
    grid, values = optimal_transform(check_n(n), mode, check_beta(beta))
    return OptimalTransform(grid, values, n=n, mode=mode, beta=beta)
