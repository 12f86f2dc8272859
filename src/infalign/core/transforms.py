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

from infalign.core.checks import check_mode, check_n

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


class BoNExpTransform(Transform):
    """`Phi(u) = (exp(t u) - 1) / (exp(t) - 1)`, t > 0: for best-of-N. `t: auto` (the theory choosing t for
    N and beta) is `infalign.theory.factories.bon_exp`; `auto` records that it chose this t."""

    name = "bon_exp"

    def __init__(self, t: float = 10.0, *, auto: bool = False):
        self.t = _positive("t", t, "bon_exp")
        self.auto = bool(auto)

    def phi(self, u):
        xp, t = _xp(u), self.t
        # exp(t(u-1)) <= 1 and expm1 ratios lie in [0, 1]: finite for every t > 0.
        return xp.exp(t * (u - 1.0)) * xp.expm1(-t * u) / math.expm1(-t)


class WoNExpTransform(Transform):
    """`Phi(u) = (1 - exp(-t u)) / (1 - exp(-t))`, t > 0: for worst-of-N. `t: auto` is
    `infalign.theory.factories.won_exp`; `auto` records that the theory chose this t."""

    name = "won_exp"

    def __init__(self, t: float = 8.0, *, auto: bool = False):
        self.t = _positive("t", t, "won_exp")
        self.auto = bool(auto)

    def phi(self, u):
        xp = _xp(u)
        return xp.expm1(-self.t * u) / math.expm1(-self.t)


class LogTransform(Transform):
    """`Phi(u) = log` of the mid-rank: best-of-N distillation (with beta = 1/(N-1) the optimum is best-of-N).

    With `m` (the calibration's M, `calibration.m` in the configs) a calibrated reward `u = b / M` is read as
    the mid-rank `(u M + 1/2) / (M + 1)`, i.e. `b / M -> (b + 1/2) / (M + 1)`: never 0 or 1, and spaced like
    the ranks themselves. The former floor `log(max(u, 1e-3))` gave a calibrated 0 the value -6.9 against
    -2.77 for the next rank (M = 16), so the rarest samples dominated the advantages; the mid-rank gives
    log(0.5/17) = -3.53 against log(1.5/17) = -2.43. (Tied ranks, `u = (b + 1/2) / M`, land between.)

    Without `m` (`m=None`, continuous inputs such as the theory's grid) `Phi(u) = log(max(u, eps))`: the
    floor keeps `u = 0` finite; its effect on the tilted density is below `eps ** (1/beta)`. `eps` is
    ignored when `m` is set.
    """

    name = "log"

    def __init__(self, eps: float = 1e-3, *, m: int | None = None):
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not float(m).is_integer() or m < 1:
                raise ValueError(f"log: `m` (the calibration's M) must be a positive integer or null, got {m!r} "
                                 "(e.g. transform.m=${calibration.m})")
            m = int(m)
        self.m = m
        self.eps = _positive("eps", eps, "log")
        if self.eps >= 1:
            raise ValueError(f"log: `eps` must be below 1, got {eps}")

    def phi(self, u):
        xp = _xp(u)
        if self.m is not None:
            return xp.log((u * self.m + 0.5) / (self.m + 1.0))
        return xp.log(xp.clip(u, self.eps, None)) if xp is np else torch.log(u.clamp_min(self.eps))


class OptimalTransform(Transform):
    """The optimal transform for N, mode and beta (math page, section 3): a table `values` on `grid`, linearly
    interpolated. The table comes from the theory's damped fixed-point iteration:
    `infalign.theory.factories.optimal(n, mode, beta)` builds it (seconds of solver work, so not hidden here).

    Unlike the exp family it is not normalised: the fixed point is the optimum for exactly this `beta`, so
    pair it with the same `beta` in training.
    """

    name = "optimal"

    def __init__(self, grid, values, *, n: int, mode: str, beta: float):
        self.n, self.mode, self.beta = check_n(n), check_mode(mode), _positive("beta", beta, "optimal")
        self._grid, self._values = np.array(grid, dtype=np.float64), np.array(values, dtype=np.float64)  # writable
        if self._grid.ndim != 1 or self._grid.shape != self._values.shape or len(self._grid) < 2:
            raise ValueError(f"optimal: grid and values must be 1-D arrays of one length >= 2, got "
                             f"{self._grid.shape} and {self._values.shape}")

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
