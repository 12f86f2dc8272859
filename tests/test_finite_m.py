"""The M-sample calibration's closed forms: `at_m` (the transform averaged over calibration sets) and the exact
fixed-cache expectation `cache_averaged_summary`."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from infalign import theory
from infalign.core.transforms import BoNExpTransform, IdentityTransform, LogTransform, RawTransform, WoNExpTransform
from infalign.theory import at_m, cache_averaged_summary, factories


def test_at_m_is_the_binomial_average_of_the_transform():
    transform, m = BoNExpTransform(10.0), 16
    u = np.random.default_rng(0).random(200)
    direct = sum(binom.pmf(b, m, u) * transform(np.array(b / m)) for b in range(m + 1))
    np.testing.assert_allclose(at_m(transform, m)(u), direct, rtol=1e-10, atol=1e-14)
    ends = at_m(transform, m)(np.array([0.0, 1.0]))  # the calibration cannot err at the ends
    np.testing.assert_allclose(ends, [0.0, 1.0], atol=1e-14)
    np.testing.assert_allclose(at_m(transform, m)(torch.tensor(u)).numpy(), direct, rtol=1e-10, atol=1e-14)


def test_at_m_leaves_identity_unchanged_and_none_returns_the_transform():
    grid = theory.default_grid()  # 16k nodes, refined to 1e-13 at the ends
    np.testing.assert_allclose(at_m(IdentityTransform(), 16)(grid), grid, atol=1e-12)  # E[b/M] = u
    won = WoNExpTransform(8.0)
    assert at_m(won, None) is won and at_m(won, 0) is won
    with pytest.raises(ValueError, match="raw"):
        at_m(RawTransform(), 16)


def test_the_issue_figure_won_exp_spends_more_at_m16():
    """factories.won_exp(n=4, beta=0.05): about 0.20 nats continuous, about 0.29 under M = 16 (at_m)."""
    won = factories.won_exp(n=4, beta=0.05)
    continuous, at_16 = theory.kl(won, 0.05), theory.kl(at_m(won, 16), 0.05)
    print(f"won_exp t={won.t:.2f} beta=0.05: KL continuous {continuous:.3f}, at_m(16) {at_16:.3f}")
    assert continuous == pytest.approx(0.20, abs=0.01) and at_16 == pytest.approx(0.29, abs=0.01)
    # the at_m form approaches the continuous one as M grows
    assert theory.kl(at_m(won, 4000), 0.05) == pytest.approx(continuous, rel=0.02)


def _simulated(transform, beta, m, n, caches=300, fresh=4000, seed=1):
    """Fresh uniform samples calibrated against sampled caches, tilted by weight: what a fixed cache realises."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("kl", "win_rate", "bon_win_rate", "won_win_rate")}
    for _ in range(caches):
        cache, u = np.sort(rng.random(m)), np.sort(rng.random(fresh))
        logits = transform(np.searchsorted(cache, u) / m) / beta
        w = np.exp(logits - logits.max())
        w /= w.sum()
        cdf = np.minimum(np.cumsum(w), 1.0)
        below = np.concatenate([[0.0], cdf[:-1]])
        out["kl"].append(np.sum(w * np.log(fresh * w)))
        out["win_rate"].append(np.sum(w * u))
        out["bon_win_rate"].append(np.sum((cdf**n - below**n) * u**n))
        out["won_win_rate"].append(np.sum(((1 - below) ** n - (1 - cdf) ** n) * (1 - (1 - u) ** n)))
    return {k: (np.mean(v), np.std(v) / math.sqrt(caches)) for k, v in out.items()}


@pytest.mark.parametrize("transform, beta", [(IdentityTransform(), 0.1), (WoNExpTransform(13.8), 0.05),
                                             (LogTransform(m=16), 0.33)])
def test_cache_averaged_summary_matches_a_direct_simulation(transform, beta):
    exact = cache_averaged_summary(transform, beta, m=16, n=4, draws=4000)
    for key, (mean, se) in _simulated(transform, beta, 16, 4).items():
        # the simulation's fresh-sample KL is biased low by O(1/fresh): allow that beside 4 standard errors
        tolerance = 4 * math.hypot(se, exact[f"{key}_se"]) + (0.01 if key == "kl" else 0.0)
        assert abs(mean - exact[key]) < tolerance, (key, mean, exact[key])


def test_cache_averaged_summary_limits():
    flat = cache_averaged_summary(BoNExpTransform(10.0), 1e6, m=16, n=4, draws=200)
    assert flat["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("win_rate", "bon_win_rate", "won_win_rate"):
        assert flat[key] == pytest.approx(0.5, abs=0.02)  # the reference against itself (up to Monte Carlo)
    # M = 1 and a hard tilt: all mass above the single cache sample, whose quantile is uniform: KL = E[-log(1-q)] = 1
    hard = cache_averaged_summary(IdentityTransform(), 1e-3, m=1, n=1, draws=20000)
    assert hard["kl"] == pytest.approx(1.0, abs=4 * hard["kl_se"])
    assert hard["win_rate"] == pytest.approx(0.75, abs=4 * hard["win_rate_se"])  # E[(1 + q)/2]
    again = cache_averaged_summary(IdentityTransform(), 0.2, m=16, n=4, draws=500, seed=3)
    assert again == cache_averaged_summary(IdentityTransform(), 0.2, m=16, n=4, draws=500, seed=3)  # seeded
