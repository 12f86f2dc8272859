"""The tilted density of calibrated rewards and its KL and win rates (math page, section 3).

Under the optimum `pi* ∝ pi_ref exp(Phi(C)/beta)` the calibrated reward `u` has density
`p(u) = exp(Phi(u)/beta) / Z` on [0, 1]. We represent `p` on a grid whose cells treat `log p` as linear,
so each cell's mass, mean and `E[log p]` have closed forms, evaluated in log space: `Phi/beta` in the
thousands (large `t`, small `beta`) neither overflows nor loses the cells near the peak. The grid is
uniform with geometric refinement towards both ends, where the exp family and `log` concentrate mass.

Pure numpy: no torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import logsumexp

from infalign.core.checks import check_beta, check_mode, check_n

__all__ = ["TiltedDensity", "analyze", "default_grid", "inference_win_rate", "kl", "tilted_density"]


@lru_cache(maxsize=8)
def default_grid(cells: int = 16384, refine_to: float = 1e-13) -> np.ndarray:
    """Nodes on [0, 1]: `cells` uniform cells plus geometric nodes down to `refine_to` from each end."""
    h = 1.0 / cells
    geometric = np.geomspace(refine_to, h, 40)[:-1]
    nodes = np.unique(np.concatenate([np.linspace(0.0, 1.0, cells + 1), geometric, 1.0 - geometric]))
    nodes.setflags(write=False)
    return nodes


def _log_expm1_ratio(d: np.ndarray) -> np.ndarray:
    """log((exp(d) - 1) / d), stable for every real d (the cell integral of exp of a linear function)."""
    ad = np.abs(d)
    small = ad < 1e-8
    safe = np.where(small, 1.0, ad)
    big = np.log(-np.expm1(-safe)) - np.log(safe) + np.maximum(d, 0.0)
    return np.where(small, d / 2.0, big)


def _cell_mean_fraction(d: np.ndarray) -> np.ndarray:
    """Mean position in [0, 1] of the density ∝ exp(d s) on s in [0, 1]."""
    ad = np.abs(d)
    small = ad < 1e-4
    safe = np.where(small, 1.0, ad)
    m_pos = 1.0 / (-np.expm1(-safe)) - 1.0 / safe  # mean fraction for +|d|
    m = np.where(d >= 0, m_pos, 1.0 - m_pos)
    return np.where(small, 0.5 + d / 12.0, m)


@dataclass(frozen=True)
class TiltedDensity:
    """`p(u) ∝ exp(Phi(u)/beta)` on a grid; cells have exact masses for piecewise-linear `log p`."""

    grid: np.ndarray  # nodes, [G + 1]
    log_density: np.ndarray  # normalised log p at the nodes, [G + 1]
    cell_mass: np.ndarray  # [G], sums to 1
    cell_mean: np.ndarray  # E[u | cell], [G]
    cell_mean_log_density: np.ndarray  # E[log p | cell], [G]

    @property
    def cdf(self) -> np.ndarray:
        """F at the nodes (F(0) = 0, F(1) = 1)."""
        return np.concatenate([[0.0], np.cumsum(self.cell_mass)]).clip(0.0, 1.0)

    @property
    def sf(self) -> np.ndarray:
        """1 - F at the nodes, summed from the right so it keeps precision where F is close to 1."""
        return np.concatenate([np.cumsum(self.cell_mass[::-1])[::-1], [0.0]]).clip(0.0, 1.0)

    def expect(self, g) -> float:
        """E_p[g(u)], with g evaluated at each cell's mean (second-order accurate in the cell width)."""
        return float(np.dot(self.cell_mass, g(self.cell_mean)))

    def kl(self) -> float:
        """KL(pi* || pi_ref) = ∫ p log p (exact for the piecewise-linear log p)."""
        return float(max(np.dot(self.cell_mass, self.cell_mean_log_density), 0.0))

    def win_rate(self) -> float:
        """Standard win rate ∫ p(u) u du."""
        return self.expect(lambda u: u)

    def bon_win_rate(self, n: int) -> float:
        """Best-of-N win rate: E[(max of N draws of p)^N] = ∫ u^N d(F^N)."""
        n = check_n(n)
        dist_of_max = np.diff(self.cdf**n)
        return float(np.dot(dist_of_max, self.cell_mean**n))

    def won_win_rate(self, n: int) -> float:
        """Worst-of-N win rate: P(min of N draws of p > min of N uniforms) = ∫ (1 - (1-u)^N) d(1 - (1-F)^N)."""
        n = check_n(n)
        sf = self.sf
        dist_of_min = sf[:-1] ** n - sf[1:] ** n
        return float(np.dot(dist_of_min, -np.expm1(n * np.log1p(-self.cell_mean))))

    def summary(self, n: int) -> dict[str, float]:
        """KL and the standard, best-of-N and worst-of-N win rates."""
        return {"kl": self.kl(), "win_rate": self.win_rate(), "bon_win_rate": self.bon_win_rate(n),
                "won_win_rate": self.won_win_rate(n)}


def _phi_values(transform, grid: np.ndarray) -> np.ndarray:
    if getattr(transform, "needs_calibration", True) is False:
        raise ValueError("the raw transform has no model-agnostic analysis: the theory needs a calibrated reward "
                         "(choose transform=identity, bon_exp, won_exp, log or optimal)")
    values = np.asarray(transform(grid), dtype=np.float64)
    if values.shape != grid.shape or not np.all(np.isfinite(values)):
        raise ValueError(f"transform {transform!r} must map the grid on [0, 1] to finite values of the same shape")
    return values


def tilted_density(transform, beta: float, grid: np.ndarray | None = None) -> TiltedDensity:
    """The density of `u` under the optimal policy for `transform` at KL strength `beta`."""
    beta = check_beta(beta)
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    lam = _phi_values(transform, grid) / beta  # log of the unnormalised density at the nodes
    width = np.diff(grid)
    slope_total = np.diff(lam)  # change of log p across each cell
    log_cell = lam[:-1] + np.log(width) + _log_expm1_ratio(slope_total)
    log_z = logsumexp(log_cell)
    mass = np.exp(log_cell - log_z)
    mass /= mass.sum()
    frac = _cell_mean_fraction(slope_total)
    return TiltedDensity(grid=grid, log_density=lam - log_z, cell_mass=mass, cell_mean=grid[:-1] + width * frac,
                         cell_mean_log_density=lam[:-1] - log_z + slope_total * frac)


def kl(transform, beta: float, grid=None) -> float:
    return tilted_density(transform, beta, grid).kl()


def inference_win_rate(density: TiltedDensity, n: int, mode: str) -> float:
    """Best-of-N (`mode="bon"`) or worst-of-N (`"won"`) win rate of a density."""
    return density.bon_win_rate(n) if check_mode(mode) == "bon" else density.won_win_rate(n)


def analyze(transform, beta: float, n: int, grid=None) -> dict[str, float]:
    """KL and the three win rates of the optimal policy for `transform`, `beta`, N."""
    return tilted_density(transform, beta, grid).summary(check_n(n))
