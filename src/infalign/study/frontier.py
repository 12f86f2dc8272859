"""The win-rate-vs-KL frontier of a transform without training: tilt fresh reference samples by weight.

The optimum of every method is a tilted reference, `pi* ∝ pi_ref exp(Phi(C)/beta)` (math page, section 2).
Given reward tables for held-out prompts we can realise it directly by importance resampling, with no policy
and no RL: per prompt,

- calibrate M' *fresh* reference samples against the M *cache* samples (the calibration set a run uses),
- weight them `w = softmax(Phi(C)/beta)` (raw: `softmax(r/beta)`): the soft best-of-M' policy, which tends to
  the fixed-cache tilt as M' grows,
- its KL to the reference is `sum w log(M' w)` (the weighted empirical against the uniform one), its effective
  sample size `1 / sum w^2`,
- its standard, best-of-N and worst-of-N win rates against an *independent* set of L reference samples
  (`infalign.core.metrics.weighted_inference_win_rate_per_prompt`).

Averaged over prompts, with standard errors over prompts, this is the frontier the trained policies are
aiming for, measured on the project's own rewards. Beside each point stand the closed forms at the same beta:
`cache_averaged_summary` (exact for the fixed-cache tilt: the one to compare with) and `at_m`.
A finite M' biases the KL down (the weighted empirical cannot spend more than log M'); watch the ESS.

Pure torch/numpy on reward tables: no models, no Lightning.
"""

from __future__ import annotations

import math

import torch

from infalign.core.calibration import EmpiricalCalibrator, check_rewards
from infalign.core.checks import check_beta, check_n
from infalign.core.metrics import weighted_inference_win_rate_per_prompt
from infalign.core.transforms import RawTransform, Transform
from infalign.theory.core import analyze
from infalign.theory.finite_m import at_m, cache_averaged_summary

__all__ = ["FRONTIER_COLUMNS", "beta_for_frontier_kl", "frontier", "tilt_weights"]

METRICS = ("kl", "win_rate", "bon_win_rate", "won_win_rate")
FRONTIER_COLUMNS = (
    "transform", "beta", "t", "kl", "kl_se", "ess", "win_rate", "win_rate_se", "bon_win_rate", "bon_win_rate_se",
    "won_win_rate", "won_win_rate_se",
    *(f"{k}_exact" for k in METRICS), *(f"{k}_at_m" for k in METRICS),
)


def tilt_weights(cache_rewards, fresh_rewards, transform: Transform | None, beta: float) -> torch.Tensor:
    """`[P, M']` weights `softmax(Phi(C)/beta)` of the fresh samples, `C` calibrated against the cache
    (`transform` None or raw: `softmax(r/beta)` on the raw rewards)."""
    beta = check_beta(beta)
    fresh, cache = check_rewards(fresh_rewards, cache_rewards)
    if transform is None or not transform.needs_calibration:
        logits = fresh / beta
    else:
        logits = torch.as_tensor(transform(EmpiricalCalibrator()(fresh, cache)), dtype=torch.float64) / beta
    return torch.softmax(logits, dim=1)


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
    return float(x.mean()), se


def frontier(cache_rewards, fresh_rewards, independent_rewards, transform: Transform | None, betas, n: int, *,
             name: str | None = None, closed_form: bool = True, draws: int = 4000, seed: int = 0) -> list[dict]:
    """One row per beta (`FRONTIER_COLUMNS`) of the resampled tilt of the fresh samples.

    cache_rewards `[P, M]`: the calibration samples; fresh_rewards `[P, M']`: the reference samples to tilt;
    independent_rewards `[P, L]`: reference samples independent of both, the reference side of the win rates
    (L >= n). `transform` None or `RawTransform()` tilts the raw rewards. `closed_form`: add the exact
    fixed-cache expectation (`cache_averaged_summary`, `draws` Monte Carlo caches, `seed`) and the `at_m` form
    at the same beta (NaN for raw, which has no model-agnostic analysis)."""
    n = check_n(n)
    fresh, cache = check_rewards(fresh_rewards, cache_rewards)
    _, independent = check_rewards(fresh_rewards, independent_rewards)
    transform = transform if transform is not None else RawTransform()
    m, m_fresh = cache.shape[1], fresh.shape[1]
    calibrated = transform.needs_calibration
    rows = []
    for beta in betas:
        beta = check_beta(float(beta))
        w = tilt_weights(cache, fresh, transform, beta)
        # KL of the weighted empirical distribution against the uniform one: sum w log(M' w), with 0 log 0 = 0
        kl = torch.where(w > 0, w * torch.log(w * m_fresh), torch.zeros_like(w)).sum(dim=1)
        ess = 1.0 / (w**2).sum(dim=1)
        row = {"transform": name or transform.name, "beta": beta, "t": getattr(transform, "t", math.nan)}
        row["kl"], row["kl_se"] = _mean_se(kl)
        row["ess"] = float(ess.mean())
        for key, nn, mode in (("win_rate", 1, "bon"), ("bon_win_rate", n, "bon"), ("won_win_rate", n, "won")):
            per_prompt = weighted_inference_win_rate_per_prompt(fresh, w, independent, nn, mode)
            row[key], row[f"{key}_se"] = _mean_se(per_prompt)
        exact = smooth = {}
        if closed_form and calibrated:
            exact = cache_averaged_summary(transform, beta, m, n, draws=draws, seed=seed)
            smooth = analyze(at_m(transform, m), beta, n)
        for k in METRICS:
            row[f"{k}_exact"] = exact.get(k, math.nan)
            row[f"{k}_at_m"] = smooth.get(k, math.nan)
        rows.append(row)
    return rows


def beta_for_frontier_kl(cache_rewards, fresh_rewards, transform: Transform | None, target_kl: float,
                         lo: float = 1e-4, hi: float = 1e4) -> float:
    """The beta at which the resampled tilt's mean KL is `target_kl` (bisection on log beta; the KL falls as
    beta grows). For raw rewards, whose scale no closed form knows. Raises ValueError when out of reach
    (the weighted empirical of M' samples spends at most log M')."""
    fresh, cache = check_rewards(fresh_rewards, cache_rewards)

    def mean_kl(log_beta: float) -> float:
        w = tilt_weights(cache, fresh, transform, math.exp(log_beta))
        return float(torch.where(w > 0, w * torch.log(w * fresh.shape[1]), torch.zeros_like(w)).sum(dim=1).mean())

    a, b = math.log(lo), math.log(hi)
    if mean_kl(a) < target_kl or mean_kl(b) > target_kl:
        raise ValueError(f"target KL {target_kl} is not reached for beta in [{lo}, {hi}] "
                         f"(KL there {mean_kl(a):.3g} .. {mean_kl(b):.3g}; at most log M' = {math.log(fresh.shape[1]):.3g})")
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if mean_kl(mid) > target_kl else (a, mid)
    return math.exp((a + b) / 2)

