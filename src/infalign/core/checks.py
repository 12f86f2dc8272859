"""The rules for N, beta and the inference mode, in one place: the config checks, the metrics, the transforms
and the theory all call these, so a value is refused with the same message wherever it enters."""

from __future__ import annotations

import math
from numbers import Real

__all__ = ["MODES", "check_beta", "check_mode", "check_n"]

MODES = ("bon", "won")  # best-of-N, worst-of-N


def check_n(n) -> int:
    """N of best-/worst-of-N: a positive integer (integral floats such as 4.0 are accepted)."""
    if isinstance(n, bool) or not isinstance(n, Real) or not float(n).is_integer():
        raise ValueError(f"n must be a positive integer (the N of best-/worst-of-N), got {n!r}; e.g. n=4")
    if n < 1:
        raise ValueError(f"n must be >= 1 (n=1 is the standard win rate), got {n!r}")
    return int(n)


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta (KL strength) must be a positive finite number, got {beta!r}; e.g. beta=0.1")
    return float(beta)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (best-of-N or worst-of-N), got {mode!r}")
    return mode
