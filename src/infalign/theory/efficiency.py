"""How KL-efficiently a run turned KL into win rate (issue 15): the two win-rate-vs-KL curves `W(kl)` a run's
measured (KL, win rate) on its **target metric** is judged against (math page, section 3).

- the **tilt** of the run's own transform, `pi_ref exp(Phi(C) / beta)` over beta, C the run's M-sample
  calibration, in the exact fixed-cache form (`cache_averaged_summary`, which docs/frontier.md matched on our
  data): what RL on this reward reaches if the solver finds its objective's optimum. Raw rewards have none;
- the **optimum**: the best win rate any policy reaches at that KL (the fixed-point optimal transform for
  best-/worst-of-N, the identity for the standard win rate), traced once per (N, metric) and reused.

`infalign.theory.run_efficiency` turns them into a run's gain fraction `(w - 0.5) / (W(k) - 0.5)` and KL
efficiency `W^-1(w) / k`. Pure numpy/scipy: no torch, no Lightning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

from infalign.core.checks import check_n
from infalign.theory.core import default_grid, tilted_density
from infalign.theory.finite_m import cache_averaged_summary
from infalign.theory.solve import LOG_BETA_RANGE, optimal_density

__all__ = ["GRID_CELLS", "KL_FLOOR", "METHOD_METRICS", "METRICS", "measured_win_rate", "optimal_tilt_at_kl",
           "optimum_at", "optimum_curve", "optimum_kl_for_win_rate", "target_metric", "tilt_at_kl",
           "tilt_kl_for_win_rate"]

GRID_CELLS = 4096  # theory grid: win rates within ~1e-5 of the 16k default, far below any seed SE, 4x faster
KL_FLOOR = 1e-6  # at or below this measured KL (k1 can dip below 0 by sampling noise) the policy is the reference
BETA_START, BETA_STOP, PER_DECADE = 30.0, 1e-4, 8  # the optimum is traced from KL ~ 0 up to where it is needed
METRICS = ("std", "bon", "won")
SUMMARY_KEYS = {"std": "win_rate", "bon": "bon_win_rate", "won": "won_win_rate"}  # TiltedDensity.summary's names
# the metric each method (conf/method/) or transform (conf/transform/) is built for (math page, section 2)
METHOD_METRICS = {"bon_exp": "bon", "bon_distill": "bon", "log": "bon", "won_exp": "won",
                  "calibrated": "std", "identity": "std", "raw": "std"}


def _grid() -> np.ndarray:
    return default_grid(GRID_CELLS)


# ---------------------------------------------------------------------------------------------- metrics
def target_metric(method: str | None = None, transform=None, metric: str | None = None) -> str:
    """The metric a run is judged on: `metric` if given, else its method's, else its transform's (a name or a
    transform object; the optimal transform carries its own mode). Raises ValueError when none is known."""
    if metric is not None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return metric
    if method in METHOD_METRICS:
        return METHOD_METRICS[method]
    name = transform if isinstance(transform, str) else getattr(transform, "name", None)
    if name in METHOD_METRICS:
        return METHOD_METRICS[name]
    mode = getattr(transform, "mode", None)  # OptimalTransform(n, mode, beta)
    if mode in ("bon", "won"):
        return mode
    raise ValueError(f"no target metric known for method {method!r} / transform {name!r}: pass metric= "
                     f"(one of {METRICS})")


def measured_win_rate(final: dict, metric: str, n: int) -> float:
    """The run's measured `metric` win rate from its final metrics (`eval/..._win_rate@N` keys); NaN if absent."""
    key = {"std": "eval/bon_win_rate@1", "bon": f"eval/bon_win_rate@{n}", "won": f"eval/won_win_rate@{n}"}[metric]
    value = final.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


# ---------------------------------------------------------------------------------------------- the tilt
TILT_DRAWS = 2000  # calibration sets averaged by the exact fixed-cache form: Monte Carlo se ~0.005 nats, 0.001 win rate


def _tilt_summary(transform, beta: float, n: int, m: int | None, grid) -> dict:
    """KL and win rates {kl, std, bon, won} of the tilt `exp(Phi(C)/beta)`: for an `m`-sample calibration the
    exact expectation over calibration sets (`cache_averaged_summary`, seeded, so a smooth function of beta,
    which the root searches below need; `at_m` misplaces sharp tilts by 15-40% in KL); else the continuous form."""
    if m is None:
        r = tilted_density(transform, beta, grid).summary(n)
    else:
        r = cache_averaged_summary(transform, beta, int(m), n, draws=TILT_DRAWS, seed=0)
    return {"kl": r["kl"], **{metric: r[key] for metric, key in SUMMARY_KEYS.items()}}


def tilt_at_kl(transform, kl: float, n: int, m: int | None = None, grid=None) -> dict:
    """Win rates of the optimal tilt of `transform` (through an `m`-sample calibration) that spends `kl`
    nats: {beta, std, bon, won}; the reference's (beta inf, 0.5) at `kl` <= KL_FLOOR. Raises ValueError when
    the tilt cannot spend `kl` (e.g. won_exp with a large t, or more than an M-sample calibration allows)."""
    if kl <= KL_FLOOR:
        return {"beta": math.inf, "std": 0.5, "bon": 0.5, "won": 0.5}
    grid = _grid() if grid is None else grid
    n = check_n(n)

    def gap(log_beta: float) -> float:
        return _tilt_summary(transform, math.exp(log_beta), n, m, grid)["kl"] - kl

    lo, hi = LOG_BETA_RANGE
    if gap(lo) < 0:
        raise ValueError(f"the tilt cannot spend {kl:.4g} nats (at most {gap(lo) + kl:.4g})")
    beta = math.exp(brentq(gap, lo, hi, xtol=1e-10, rtol=1e-10))
    return {"beta": beta, **{k: v for k, v in _tilt_summary(transform, beta, n, m, grid).items() if k != "kl"}}


def optimal_tilt_at_kl(transform, kl: float, n: int, metric: str, m: int | None = None, grid=None) -> float:
    """The `metric` win rate the optimal tilt `exp(Phi(C) / beta)` reaches when it spends `kl` nats."""
    return tilt_at_kl(transform, kl, check_n(n), m, grid)[target_metric(metric=metric)]


def tilt_kl_for_win_rate(transform, win: float, n: int, metric: str, m: int | None = None,
                         grid=None) -> tuple[float, bool]:
    """`(kl, capped)`: the KL the optimal tilt of `transform` needs to reach win rate `win` on `metric`.

    The tilt's win rate rises monotonically as beta falls (`exp(Phi/beta)` for an increasing Phi orders the
    densities by likelihood ratio, so u, the max and the min of N draws all grow stochastically), so a root
    search on log beta finds it. `win` <= 0.5 needs no KL (0). Above what the sharpest tilt reaches: that
    tilt's KL and `capped` True."""
    n, metric = check_n(n), target_metric(metric=metric)
    if not win > 0.5:
        return 0.0, False
    grid = _grid() if grid is None else grid

    def gap(log_beta: float) -> float:
        return _tilt_summary(transform, math.exp(log_beta), n, m, grid)[metric] - win

    lo, hi = LOG_BETA_RANGE
    if gap(lo) < 0:
        return _tilt_summary(transform, math.exp(lo), n, m, grid)["kl"], True
    if gap(hi) >= 0:  # within float noise of 0.5
        return _tilt_summary(transform, math.exp(hi), n, m, grid)["kl"], False
    log_beta = brentq(gap, lo, hi, xtol=1e-12, rtol=1e-12)
    return _tilt_summary(transform, math.exp(log_beta), n, m, grid)["kl"], False


# ---------------------------------------------------------------------------------------------- the optimum
_CURVES: dict[tuple[int, str], tuple[float, np.ndarray, np.ndarray]] = {}  # (n, metric) -> (KL asked, kls, wins)


def _trace_optimum(n: int, metric: str, kl_needed: float) -> tuple[np.ndarray, np.ndarray]:
    # Each beta costs a fixed-point solve (~0.05-0.4 s), so walk beta down only until the curve passes the
    # largest KL asked for.
    from infalign.core.transforms import IdentityTransform

    kls, wins = [0.0], [0.5]
    steps = int(math.ceil(math.log10(BETA_START / BETA_STOP) * PER_DECADE)) + 1
    for beta in np.geomspace(BETA_START, BETA_STOP, steps):
        if metric == "std":  # the standard win rate's optimum is the identity transform (N = 1)
            d = tilted_density(IdentityTransform(), float(beta), _grid())
        else:
            d = optimal_density(n, metric, float(beta), _grid())
        if d.kl() > kls[-1]:  # KL grows as beta falls; drop numerically flat points so x stays increasing
            kls.append(d.kl())
            wins.append(d.summary(n)[SUMMARY_KEYS[metric]])
        if kls[-1] > kl_needed:
            break
    return np.array(kls), np.maximum.accumulate(np.array(wins))


def _curve_key(n: int, mode: str) -> tuple[int, str]:
    return (1 if mode == "std" else int(n), mode)  # the standard win rate's optimum does not depend on N


def optimum_curve(n: int, mode: str, kl_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(KL, best achievable win rate) of the optimum from KL 0 to past `kl_max` (it may extend further: one
    curve per N and mode is kept and only ever extended; it stops early where beta reaches BETA_STOP); mode
    bon, won or std."""
    key = _curve_key(n, mode)
    need = max(float(kl_max), 0.0) * 1.25 + 0.05
    if key not in _CURVES or _CURVES[key][0] < need:
        need = 2.0 ** math.ceil(math.log2(need))  # round up: a slightly larger KL later reuses this curve
        _CURVES[key] = (need, *_trace_optimum(*key, need))
    return _CURVES[key][1], _CURVES[key][2]


def _pchip(kls: np.ndarray, wins: np.ndarray):
    from scipy.interpolate import PchipInterpolator

    return PchipInterpolator(kls, wins)  # shape-preserving: monotone data gives a monotone interpolant


def optimum_at(n: int, mode: str, kl: float) -> float:
    """The optimum's win rate at `kl`: shape-preserving (PCHIP) interpolation of `optimum_curve`."""
    kl = max(float(kl), 0.0)
    kls, wins = optimum_curve(n, mode, kl)
    return float(_pchip(kls, wins)(min(kl, kls[-1])))


def optimum_kl_for_win_rate(n: int, metric: str, win: float) -> tuple[float, bool]:
    """`(kl, capped)`: the least KL at which any policy reaches win rate `win` on `metric` (the inverse of
    `optimum_at`, same interpolant); 0 for `win` <= 0.5; the curve's end and `capped` above its reach."""
    if not win > 0.5:
        return 0.0, False
    kl_max = 1.0
    for _ in range(16):  # extend the traced curve (doubling) until it passes `win` or cannot go further
        kls, wins = optimum_curve(n, metric, kl_max)
        if wins[-1] >= win:
            curve = _pchip(kls, wins)
            root = brentq(lambda x, c=curve: float(c(x)) - win, 0.0, float(kls[-1]), xtol=1e-13, rtol=1e-12)
            return float(root), False
        if kls[-1] < _CURVES[_curve_key(n, metric)][0]:  # the trace reached BETA_STOP short of the KL asked:
            return float(kls[-1]), True  # its end is the curve's end

        kl_max = float(kls[-1]) * 2.0
    return float(kls[-1]), True


