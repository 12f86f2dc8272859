"""Solving with the closed forms: beta for a target KL, the best `t`, the optimal transform, curves.

Pure numpy/scipy: no torch, no Lightning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from infalign.core.checks import check_beta, check_mode, check_n
from infalign.core.transforms import BoNExpTransform, WoNExpTransform
from infalign.theory.core import TiltedDensity, default_grid, inference_win_rate, tilted_density

__all__ = ["beta_for_kl", "best_t", "optimal_transform", "optimal_density", "win_rate_curves", "TabulatedPhi"]

LOG_BETA_RANGE = (math.log(1e-7), math.log(1e7))


def _check_kl(target_kl) -> float:
    if not isinstance(target_kl, (int, float)) or not math.isfinite(target_kl) or target_kl <= 0:
        raise ValueError(f"target KL must be a positive finite number (nats), got {target_kl!r}")
    return float(target_kl)


def beta_for_kl(transform, target_kl: float, grid=None) -> float:
    """The `beta` at which the optimal policy for `transform` has KL(pi* || pi_ref) = `target_kl`.

    KL falls monotonically as beta grows (beta -> inf gives the reference), so a root search on log beta
    brackets it.
    """
    target_kl = _check_kl(target_kl)

    def gap(log_beta: float) -> float:
        return tilted_density(transform, math.exp(log_beta), grid).kl() - target_kl

    lo, hi = LOG_BETA_RANGE
    if gap(lo) < 0:
        raise ValueError(f"transform {transform!r} cannot reach KL {target_kl}: its KL at beta={math.exp(lo):.1e} is "
                         f"{gap(lo) + target_kl:.4g} nats; ask for a smaller target KL")
    return math.exp(brentq(gap, lo, hi, xtol=1e-10, rtol=1e-10))


def best_t(mode: str, n: int, target_kl: float, t_range: tuple[float, float] = (0.05, 300.0),
           grid=None) -> dict[str, float]:
    """The `t` of `bon_exp` (mode "bon") or `won_exp` (mode "won") that maximises the best-/worst-of-N
    win rate at KL = `target_kl`. Returns {"t", "beta", "win_rate"} (the last in the chosen mode).

    A coarse scan over log t finds the best bracket, then a bounded scalar search refines it.
    """
    mode, n, target_kl = check_mode(mode), check_n(n), _check_kl(target_kl)
    family = BoNExpTransform if mode == "bon" else WoNExpTransform
    coarse_grid = default_grid(2048) if grid is None else grid

    def win_at(log_t: float, g) -> tuple[float, float]:
        transform = family(t=math.exp(log_t))
        try:
            beta = beta_for_kl(transform, target_kl, g)
        except ValueError:
            # Large t flattens won_exp near u = 1 below float64 resolution, which caps its KL: such t
            # cannot reach the target and are simply not candidates.
            return -math.inf, math.nan
        return inference_win_rate(tilted_density(transform, beta, g), n, mode), beta

    log_ts = np.linspace(math.log(t_range[0]), math.log(t_range[1]), 25)
    wins = [win_at(x, coarse_grid)[0] for x in log_ts]
    if not np.isfinite(max(wins)):
        raise ValueError(f"no t in {t_range} reaches KL {target_kl} with {family.name}; ask for a smaller KL")
    i = int(np.argmax(wins))
    lo, hi = log_ts[max(i - 1, 0)], log_ts[min(i + 1, len(log_ts) - 1)]
    res = minimize_scalar(lambda x: -win_at(x, grid)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
    win, beta = win_at(res.x, grid)
    return {"t": math.exp(res.x), "beta": beta, "win_rate": win}


class TabulatedPhi:
    """A transform given by values on grid nodes, linearly interpolated (numpy only)."""

    def __init__(self, grid: np.ndarray, values: np.ndarray):
        self.grid, self.values = np.asarray(grid), np.asarray(values)

    def __call__(self, u):
        return np.interp(u, self.grid, self.values)


def _cumulative_trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(x))])


def _functional_derivative(density: TiltedDensity, n: int, mode: str) -> np.ndarray:
    """Phi*(v) of the math page, section 3, on the density's grid."""
    u = density.grid
    if mode == "bon":  # N^2 ∫_0^v F^(N-1) u^(N-1) du
        integrand = density.cdf ** (n - 1) * u ** (n - 1)
        return n * n * _cumulative_trapezoid(integrand, u)
    # worst-of-N: -N^2 ∫_v^1 (1-F)^(N-1) (1-u)^(N-1) du
    integrand = density.sf ** (n - 1) * (1.0 - u) ** (n - 1)
    from_left = _cumulative_trapezoid(integrand, u)
    return -n * n * (from_left[-1] - from_left)


def optimal_transform(n: int, mode: str, beta: float, grid=None, damping: float = 0.5, tol: float = 1e-10,
                      max_iter: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """The optimal transform `Phi*` for N, mode and beta by damped fixed-point iteration from `Phi = u`.

    Returns `(grid, values)`. The damping halves whenever the residual grows, which keeps small-beta
    settings (a sharply tilted density) from oscillating. Raises `RuntimeError` if it does not converge.
    """
    n, mode, beta = check_n(n), check_mode(mode), check_beta(beta)
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    phi = grid.copy()
    last_residual = math.inf
    for _ in range(max_iter):
        target = _functional_derivative(tilted_density(TabulatedPhi(grid, phi), beta, grid), n, mode)
        residual = float(np.max(np.abs(target - phi)))
        if residual < tol * max(1.0, float(np.max(np.abs(phi)))):
            return grid, target
        if residual > last_residual:
            damping = max(damping * 0.5, 1e-3)
        last_residual = residual
        phi = (1.0 - damping) * phi + damping * target
    raise RuntimeError(f"optimal transform did not converge for n={n}, mode={mode}, beta={beta} in {max_iter} "
                       f"iterations (residual {last_residual:.2e}); try a larger beta or max_iter")


def optimal_density(n: int, mode: str, beta: float, grid=None) -> TiltedDensity:
    """The tilted density of the optimal transform (its KL and win rates are the theoretical optimum)."""
    g, values = optimal_transform(n, mode, beta, grid)
    return tilted_density(TabulatedPhi(g, values), beta, g)


def win_rate_curves(transforms: dict, ns, betas, include_optimal: bool = True, grid=None) -> list[dict]:
    """Rows {transform, n, beta, kl, win_rate, bon_win_rate, won_win_rate} for every transform x N x beta.

    With `include_optimal`, adds `optimal_bon` and `optimal_won`: the optimum for each N and beta.
    """
    rows = []
    ns = [check_n(n) for n in ns]
    betas = [check_beta(b) for b in betas]
    for name, transform in transforms.items():
        for beta in betas:
            density = tilted_density(transform, beta, grid)
            for n in ns:
                rows.append({"transform": name, "n": n, "beta": beta, **density.summary(n)})
    if include_optimal:
        for mode in ("bon", "won"):
            for n in ns:
                for beta in betas:
                    density = optimal_density(n, mode, beta, grid)
                    rows.append({"transform": f"optimal_{mode}", "n": n, "beta": beta, **density.summary(n)})
    return rows
