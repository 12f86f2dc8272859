"""Reward transforms `Phi` (math page, section 2, step 2).

Every transform maps a calibrated reward `u` in [0, 1] to the reward used by RL, and works on torch
tensors and numpy arrays alike (the theory evaluates the same objects on a numpy grid). The exp family is
written in the [0, 1]-normalised forms of the math page and evaluated so that no `t` overflows:

    bon_exp(u) = (exp(t u) - 1) / (exp(t) - 1) = exp(t (u - 1)) * expm1(-t u) / expm1(-t)
    won_exp(u) = (1 - exp(-t u)) / (1 - exp(-t)) = expm1(-t u) / expm1(-t)

Pure torch/numpy: no Lightning here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

__all__ = [
    "Transform",
    "RawTransform",
    "IdentityTransform",
    "BoNExpTransform",
    "WoNExpTransform",
    "LogTransform",
    "OptimalTransform",
]


def _xp(u):
    """The array namespace of `u`: torch for tensors, numpy otherwise."""
    return torch if isinstance(u, torch.Tensor) else np


def _as_array(u):
    if isinstance(u, torch.Tensor):
        return u if u.is_floating_point() else u.to(torch.get_default_dtype())
    return np.asarray(u, dtype=np.float64)


def _positive(name: str, value, owner: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: `{name}` must be a positive number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: `{name}` must be a positive finite number, got {value!r} (e.g. transform.{name}=4)")
    return value


class Transform(ABC):
    """Base class: `transform(u)` validates its input, then applies `phi`.

    `needs_calibration` is False only for `raw`, whose input is the reward model's own score.
    """

    name = "transform"
    needs_calibration = True

    @abstractmethod
    def phi(self, u):
        """`Phi(u)` on an already validated torch tensor or numpy array."""

    def __call__(self, u):
        u = _as_array(u)
        xp = _xp(u)
        if not bool(xp.all(xp.isfinite(u))):
            raise ValueError(f"{self.name}: input holds NaN or inf; calibrated rewards must be finite values in [0, 1]")
        if self.needs_calibration and (bool((u < 0).any()) or bool((u > 1).any())):
            raise ValueError(
                f"{self.name}: calibrated rewards must lie in [0, 1], got values in "
                f"[{float(u.min())}, {float(u.max())}]; use calibrator=empirical, or transform=raw for raw rewards"
            )
        return self.phi(u)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class RawTransform(Transform):
    """`R = r`: the raw reward, uncalibrated (the classic RLHF baseline; pair with calibrator=passthrough)."""

    name = "raw"
    needs_calibration = False

    def phi(self, u):
        return u


class IdentityTransform(Transform):
    """`Phi(u) = u`: targets the standard win rate."""

    name = "identity"

    def phi(self, u):
        return u


def _resolve_t(t, mode: str, n, beta, target_kl, owner: str) -> float:
    """A fixed `t`, or with `t="auto"` the theory's best `t` for best-/worst-of-N at a target KL.

    The target KL defaults to the KL of the optimal policy for (N, mode, beta): the exp-family member that
    is best at the KL the inference-aware optimum itself spends at this beta.
    """
    if t != "auto":
        return _positive("t", t, owner)
    from infalign.theory import best_t, check_beta, check_n, optimal_density

    if n is None or (beta is None and target_kl is None):
        raise ValueError(f"{owner}: t=auto needs n and beta (or target_kl) to choose t; they default to the run's")
    if target_kl is None:
        target_kl = optimal_density(check_n(n), mode, check_beta(beta)).kl()
    return best_t(mode, n, _positive("target_kl", target_kl, owner))["t"]


class BoNExpTransform(Transform):
    """`Phi(u) = (exp(t u) - 1) / (exp(t) - 1)`, t > 0: for best-of-N. `t="auto"`: see `_resolve_t`."""

    name = "bon_exp"

    def __init__(self, t: float | str = 10.0, n: int | None = None, beta: float | None = None,
                 target_kl: float | None = None):
        self.t = _resolve_t(t, "bon", n, beta, target_kl, "bon_exp")
        self.auto = t == "auto"

    def phi(self, u):
        xp, t = _xp(u), self.t
        # exp(t(u-1)) <= 1 and expm1 ratios lie in [0, 1]: finite for every t > 0.
        return xp.exp(t * (u - 1.0)) * xp.expm1(-t * u) / math.expm1(-t)


class WoNExpTransform(Transform):
    """`Phi(u) = (1 - exp(-t u)) / (1 - exp(-t))`, t > 0: for worst-of-N. `t="auto"`: see `_resolve_t`."""

    name = "won_exp"

    def __init__(self, t: float | str = 8.0, n: int | None = None, beta: float | None = None,
                 target_kl: float | None = None):
        self.t = _resolve_t(t, "won", n, beta, target_kl, "won_exp")
        self.auto = t == "auto"

    def phi(self, u):
        xp = _xp(u)
        return xp.expm1(-self.t * u) / math.expm1(-self.t)


class LogTransform(Transform):
    """`Phi(u) = log(max(u, eps))`: best-of-N distillation (with beta = 1/(N-1) the optimum is best-of-N).

    The floor `eps` keeps `u = 0` (a sample below every reference sample) finite; its effect on the
    tilted density is below `eps ** (1/beta)`.
    """

    name = "log"

    def __init__(self, eps: float = 1e-3):
        self.eps = _positive("eps", eps, "log")
        if self.eps >= 1:
            raise ValueError(f"log: `eps` must be below 1, got {eps}")

    def phi(self, u):
        xp = _xp(u)
        return xp.log(xp.clip(u, self.eps, None)) if xp is np else torch.log(u.clamp_min(self.eps))


class OptimalTransform(Transform):
    """The optimal transform for N, mode and beta (math page, section 3), tabulated by the theory's damped
    fixed-point iteration and linearly interpolated.

    Unlike the exp family it is not normalised: the fixed point is the optimum for exactly this `beta`, so
    pair it with the same `beta` in training.
    """

    name = "optimal"

    def __init__(self, n: int = 4, mode: str = "bon", beta: float = 0.1):
        from infalign.theory import check_mode, check_n, optimal_transform  # theory imports this module

        self.n = check_n(n)
        self.mode = check_mode(mode)
        self.beta = _positive("beta", beta, "optimal")
        grid, values = optimal_transform(self.n, self.mode, self.beta)
        self._grid, self._values = np.array(grid), np.array(values)  # writable copies (torch.as_tensor)

    def phi(self, u):
        if isinstance(u, torch.Tensor):
            grid = torch.as_tensor(self._grid, dtype=u.dtype, device=u.device)
            values = torch.as_tensor(self._values, dtype=u.dtype, device=u.device)
            # torch has no np.interp: locate the cell and interpolate linearly.
            idx = torch.searchsorted(grid, u.contiguous(), right=True).clamp(1, len(grid) - 1)
            lo, hi = grid[idx - 1], grid[idx]
            w = (u - lo) / (hi - lo)
            return values[idx - 1] + w * (values[idx] - values[idx - 1])
        return np.interp(u, self._grid, self._values)
