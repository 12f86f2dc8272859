"""The closed forms under the M-sample calibration the runs actually use (math page, section 2, step 1).

A run calibrates against M reference samples per prompt: a response at true quantile `u` gets `C = b / M`, `b` the
cache samples below it. Two ways to carry this into the closed forms of `infalign.theory.core`:

- `at_m(transform, m)`: the transform averaged over caches, `Phi_M(u) = E[Phi(b/M)]`, `b ~ Binomial(M, u)`; every
  closed form then evaluates unchanged. Cheap and smooth: the study's beta grids use it.
- `cache_averaged_summary(...)`: the exact expectation for a *fixed* cache, which a run (and the frontier of
  `infalign.study.frontier`) realises. Given the cache the tilt is piecewise constant on cells of widths
  `s_0..s_M ~ Dirichlet(1, ..., 1)`; per cache the KL and win rates are closed forms, averaged over caches by
  seeded Monte Carlo.

They part where the tilt is sharp between neighbouring ranks (`compare()`, M = 16, N = 4, 4000 draws, measured
2026-11-23; the exact KL's Monte Carlo s.e. in brackets; "cont." = M infinite):

    transform        beta   KL exact      KL at_m  KL cont.  bon exact  bon at_m  won exact  won at_m
    identity         0.05   2.014(0.008)  1.996    1.996     0.9306     0.9518    0.9985     0.9994
    identity         0.20   0.673(0.002)  0.650    0.650     0.8195     0.8284    0.9215     0.9243
    bon_exp t=10     0.02   3.383(0.020)  4.879    5.173     0.9551     0.9972    0.9999     1.0000
    bon_exp t=10     0.10   3.102(0.014)  3.026    3.291     0.9542     0.9846    0.9974     0.9975
    won_exp t=8      0.02   0.561(0.003)  0.645    0.540     0.7083     0.7372    0.9437     0.9700
    won_exp t=8      0.10   0.277(0.002)  0.305    0.251     0.6264     0.6436    0.8508     0.8856
    won_exp t=13.8   0.05   0.229(0.002)  0.286    0.201     0.5910     0.6166    0.8147     0.8753

(the last row is `factories.won_exp(n=4, beta=0.05)`). So `at_m` for beta grids, `cache_averaged_summary`
whenever a realised fixed-cache tilt (a run, the frontier) is compared with theory; the exact per-cache values
were checked against a direct simulation (tests/test_finite_m.py). Pure numpy/scipy: no torch, no Lightning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, log_softmax

from infalign.core.checks import check_beta, check_n
from infalign.core.transforms import Transform

__all__ = ["CalibratedAtM", "at_m", "binomial_weights", "cache_averaged_summary", "compare"]


_MAX_WEIGHTS = 1 << 22  # binomial weights evaluated at once (32 MiB of float64)


def _check_m(m) -> int:
    if isinstance(m, bool) or not float(m).is_integer():
        raise ValueError(f"m (reference samples per prompt) must be a positive integer, got {m!r}")
    return int(m)


def binomial_weights(u: np.ndarray, m: int) -> np.ndarray:
    """`Binom(b; M, u)` for b = 0..M, shape `[M + 1, *u.shape]`, from log-binomials (exact 0 and 1 at the ends)."""
    u = np.asarray(u, dtype=np.float64)
    b = np.arange(m + 1, dtype=np.float64).reshape((-1,) + (1,) * u.ndim)
    log_choose = gammaln(m + 1.0) - gammaln(b + 1.0) - gammaln(m - b + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # b log u + (M - b) log(1 - u), with 0 log 0 = 0 so that u = 0 and u = 1 put all mass on b = 0 and M
        log_u = np.where(b > 0, b * np.log(u), 0.0)
        log_1mu = np.where(b < m, (m - b) * np.log1p(-u), 0.0)
    return np.exp(log_choose + log_u + log_1mu)


class CalibratedAtM(Transform):
    """`Phi_M(u) = sum_b Binom(b; M, u) Phi(b/M)`: `transform` seen through an M-sample calibration, averaged
    over calibration sets (see the module docstring for when this is, and is not, the exact form)."""

    needs_calibration = True

    def __init__(self, transform: Transform, m: int):
        if not getattr(transform, "needs_calibration", True):
            raise ValueError("at_m: the raw transform sees no calibration; there is nothing to average over")
        self.transform, self.m = transform, _check_m(m)
        self.name = f"{getattr(transform, 'name', 'transform')}@M={self.m}"
        # Phi at the M + 1 values the calibration can take: evaluated once, reused for every u
        self._phi_at_ranks = np.asarray(transform(np.arange(self.m + 1) / self.m), dtype=np.float64)

    def phi(self, u):
        if not isinstance(u, np.ndarray):  # torch: the theory works in numpy; convert at the border
            import torch

            out = self.phi(u.detach().cpu().double().numpy())
            return torch.as_tensor(out, dtype=u.dtype, device=u.device)
        flat = np.asarray(u, dtype=np.float64).reshape(-1)
        out = np.empty_like(flat)
        step = max(1, _MAX_WEIGHTS // (self.m + 1))  # a large M times the 16k-node grid: bound the [M+1, G] table
        for i in range(0, flat.size, step):
            out[i : i + step] = self._phi_at_ranks @ binomial_weights(flat[i : i + step], self.m)
        return out.reshape(np.shape(u))


def at_m(transform: Transform, m: int | None) -> Transform:
    """`transform` under an M-sample calibration (`CalibratedAtM`); `m` None or <= 0: the continuous form,
    the transform itself, unchanged."""
    if m is None or m <= 0:
        return transform
    return CalibratedAtM(transform, m)


# ---------------------------------------------------------------------------------------------- exact, fixed cache
def _gauss_legendre_on_unit(points: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(points)
    return (x + 1.0) / 2.0, w / 2.0


def _piecewise_summary(spacings: np.ndarray, log_tilt: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """KL and win rates of the piecewise-uniform densities with cell widths `spacings` `[D, M + 1]` and cell
    log-weights `log_tilt` `[M + 1]` (the density is ∝ exp(log_tilt_b) on cell b), one value per row."""
    log_s = np.log(spacings)
    log_q = log_softmax(log_s + log_tilt, axis=1)  # cell masses q_b ∝ s_b exp(Phi(b/M)/beta)
    q = np.exp(log_q)
    kl = np.sum(q * (log_q - log_s), axis=1).clip(min=0.0)  # ∫ p log p = sum_b q_b log(q_b / s_b)
    right = np.cumsum(spacings, axis=1)
    right[:, -1] = 1.0
    left = right - spacings
    win_rate = np.sum(q * (left + right) / 2.0, axis=1)  # E[u]: each cell's mean is its midpoint
    # On a cell F is linear, so u^N d(F^N) and (1 - (1-u)^N) d(1 - (1-F)^N) are polynomials of degree 2N - 1
    # in u: Gauss-Legendre with N nodes per cell integrates them exactly.
    x, w = _gauss_legendre_on_unit(n)
    u = left[..., None] + spacings[..., None] * x  # [D, M + 1, N] nodes
    f_left = np.cumsum(q, axis=1) - q  # F at each cell's left end
    f = (f_left[..., None] + q[..., None] * x).clip(0.0, 1.0)
    dq = q[..., None] * w  # dF over the node's share of the cell
    bon = np.sum(n * f ** (n - 1) * u**n * dq, axis=(1, 2))
    sf = (1.0 - f).clip(0.0, 1.0)
    won = np.sum(n * sf ** (n - 1) * (1.0 - (1.0 - u.clip(0.0, 1.0)) ** n) * dq, axis=(1, 2))
    return {"kl": kl, "win_rate": win_rate, "bon_win_rate": bon, "won_win_rate": won}


def cache_averaged_summary(transform: Transform, beta: float, m: int, n: int, draws: int = 4000,
                           seed: int = 0) -> dict[str, float]:
    """The exact expectation over calibration sets of M reference samples of the KL and the standard,
    best-of-N and worst-of-N win rates of the fixed-cache tilt `p(u) ∝ exp(Phi(C)/beta)` (module docstring).

    Seeded Monte Carlo over the spacings (`draws` caches); each draw is in closed form. Returns the four means
    and their Monte Carlo standard errors (`kl_se`, ...)."""
    beta, n, m = check_beta(beta), check_n(n), _check_m(m)
    if m < 1:
        raise ValueError(f"cache_averaged_summary: m must be >= 1, got {m}")
    if not getattr(transform, "needs_calibration", True):
        raise ValueError("cache_averaged_summary: the raw transform has no model-agnostic analysis")
    log_tilt = np.asarray(transform(np.arange(m + 1) / m), dtype=np.float64) / beta
    spacings = np.random.default_rng(seed).dirichlet(np.ones(m + 1), size=int(draws))
    # a spacing can underflow to 0 for tiny M-th spacings only at M in the millions; guard the log anyway
    spacings = np.maximum(spacings, np.finfo(np.float64).tiny)
    per_draw = _piecewise_summary(spacings, log_tilt, n)
    out = {k: float(v.mean()) for k, v in per_draw.items()}
    out.update({f"{k}_se": float(v.std(ddof=1) / math.sqrt(len(v))) for k, v in per_draw.items()})
    return out


def compare(m: int = 16, n: int = 4, draws: int = 4000) -> list[dict]:
    """The table of the module docstring: exact fixed-cache values vs `at_m` vs the continuous form."""
    from infalign.core.transforms import BoNExpTransform, IdentityTransform, WoNExpTransform
    from infalign.theory.core import analyze
    from infalign.theory.factories import won_exp as auto_won_exp

    auto_won = auto_won_exp(n=n, beta=0.05)
    points = [(IdentityTransform(), 0.05), (IdentityTransform(), 0.2), (BoNExpTransform(10.0), 0.02),
              (BoNExpTransform(10.0), 0.1), (WoNExpTransform(8.0), 0.02), (WoNExpTransform(8.0), 0.1),
              (auto_won, 0.05)]
    rows = []
    print("transform             beta   KL exact(se)     KL at_m  KL cont.  bon exact  bon at_m  won exact  won at_m")
    for transform, beta in points:
        exact = cache_averaged_summary(transform, beta, m, n, draws=draws)
        smooth, cont = analyze(at_m(transform, m), beta, n), analyze(transform, beta, n)
        label = transform.name + (f" t={transform.t:.3g}" if hasattr(transform, "t") else "")
        print(f"{label:20s} {beta:5.3f}  {exact['kl']:.3f}({exact['kl_se']:.3f})  {smooth['kl']:8.3f}  "
              f"{cont['kl']:8.3f}  {exact['bon_win_rate']:9.4f}  {smooth['bon_win_rate']:8.4f}  "
              f"{exact['won_win_rate']:9.4f}  {smooth['won_win_rate']:8.4f}")
        rows.append({"transform": label, "beta": beta, "exact": exact, "at_m": smooth, "continuous": cont})
    return rows
