"""The frontier without training (`infalign.study.frontier`) and its weighted win-rate estimator."""

import itertools
import math

import numpy as np
import pytest
import torch

from infalign import theory
from infalign.core.metrics import inference_win_rate_per_prompt, weighted_inference_win_rate_per_prompt
from infalign.core.transforms import BoNExpTransform, IdentityTransform, RawTransform, WoNExpTransform
from infalign.study.frontier import FRONTIER_COLUMNS, beta_for_frontier_kl, frontier


# ------------------------------------------------------------------------------------- weighted estimator
def _brute_force(a, w, b, n, mode):
    """Every N-tuple of policy draws (with replacement, probability the product of weights) against every
    N-subset of the reference, ties half."""
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    pick = max if mode == "bon" else min
    total = 0.0
    subsets = list(itertools.combinations(range(len(b)), n))
    for draw in itertools.product(range(len(a)), repeat=n):
        p = np.prod([w[i] for i in draw])
        mine = pick(a[i] for i in draw)
        for sub in subsets:
            theirs = pick(b[j] for j in sub)
            beats = mine > theirs  # the higher maximum (bon) or the higher minimum (won) wins
            total += p * (float(beats) + 0.5 * float(mine == theirs)) / len(subsets)
    return total


@pytest.mark.parametrize("mode", ["bon", "won"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_weighted_win_rate_matches_brute_force_with_ties(n, mode):
    cases = [
        ([0.2, 0.7, 0.5], [0.1, 0.6, 0.2], [0.3, 0.5, 0.9, 0.1]),
        ([1.0, 1.0, 2.0, 0.0], [0.4, 0.1, 0.2, 0.3], [1.0, 2.0, 0.0, 1.0]),  # ties within and across sides
        ([3.0, 1.0], [0.0, 1.0], [1.0, 3.0, 3.0]),  # a zero weight
    ]
    for a, w, b in cases:
        got = weighted_inference_win_rate_per_prompt(torch.tensor([a]), torch.tensor([w]), torch.tensor([b]), n, mode)
        assert float(got[0]) == pytest.approx(_brute_force(a, w, b, n, mode), abs=1e-8), (a, w, b)  # lgamma rounding


def test_uniform_weights_and_n1_reduce_to_the_unweighted_estimator():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 6, (5, 9), generator=g).double(), torch.randint(0, 6, (5, 7), generator=g).double()
    for mode in ("bon", "won"):
        weighted = weighted_inference_win_rate_per_prompt(a, torch.ones_like(a), b, 1, mode)
        torch.testing.assert_close(weighted, inference_win_rate_per_prompt(a, b, 1, mode), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_inference_win_rate_per_prompt(a, -torch.ones_like(a), b, 1, "bon")
    with pytest.raises(ValueError, match="shape"):
        weighted_inference_win_rate_per_prompt(a, torch.ones(5, 3), b, 1, "bon")


# --------------------------------------------------------------------------------------------- frontier
P, M, M_FRESH, L, N = 400, 16, 256, 64, 4


@pytest.fixture(scope="module")
def uniform_rewards():
    """Reference rewards i.i.d. Uniform(0, 1): the true quantile of a sample is its reward."""
    g = torch.Generator().manual_seed(0)
    draw = lambda k: torch.rand(P, k, generator=g, dtype=torch.float64)  # noqa: E731
    return draw(M), draw(M_FRESH), draw(L)


@pytest.mark.parametrize("transform, betas", [
    (IdentityTransform(), (0.1, 0.3)),
    (BoNExpTransform(10.0), (0.2, 0.5)),
    (WoNExpTransform(8.0), (0.05, 0.2)),
])
def test_frontier_agrees_with_the_exact_fixed_cache_closed_form(uniform_rewards, transform, betas):
    rows = frontier(*uniform_rewards, transform, betas, N)
    assert [r["beta"] for r in rows] == list(betas) and all(set(FRONTIER_COLUMNS) <= set(r) for r in rows)
    for row in rows:
        assert 1.0 <= row["ess"] <= M_FRESH
        for key in ("kl", "win_rate", "bon_win_rate", "won_win_rate"):
            # the frontier's standard error covers prompts (caches, fresh and independent samples alike);
            # a finite M' biases the KL low, by about 1 % at these ESS
            tolerance = 4 * row[f"{key}_se"] + (0.01 * row["kl_exact"] if key == "kl" else 0.0)
            assert abs(row[key] - row[f"{key}_exact"]) < tolerance, (transform.name, row["beta"], key, row)


def test_raw_tilt_of_uniform_rewards_approaches_the_continuous_identity_form():
    """Rewards already uniform: exp(r/beta) is the continuous identity tilt itself (no M-sample calibration),
    so as M' grows the raw frontier meets `theory.analyze(identity)` rather than its M = 16 forms."""
    g = torch.Generator().manual_seed(1)
    p, beta = 200, 0.1
    cache, independent = torch.rand(p, M, generator=g, dtype=torch.float64), torch.rand(p, L, generator=g, dtype=torch.float64)
    continuous = theory.analyze(IdentityTransform(), beta, N)
    gaps = {}
    for m_fresh in (16, 2048):
        fresh = torch.rand(p, m_fresh, generator=g, dtype=torch.float64)
        (row,) = frontier(cache, fresh, independent, RawTransform(), [beta], N)
        assert math.isnan(row["kl_exact"]) and row["transform"] == "raw"  # no closed form for raw rewards
        gaps[m_fresh] = abs(row["kl"] - continuous["kl"])
    for key in ("kl", "win_rate", "bon_win_rate", "won_win_rate"):
        assert abs(row[key] - continuous[key]) < 4 * row[f"{key}_se"] + 1e-3, (key, row[key], continuous[key])
    assert gaps[2048] < gaps[16] / 5  # M' = 16 cannot hold the tilt (at most log 16 nats, a coarse sample)
    # and the search for raw betas finds the beta that spends a target KL
    target = 0.5
    found = beta_for_frontier_kl(cache, fresh, RawTransform(), target)
    (at_found,) = frontier(cache, fresh, independent, None, [found], N, closed_form=False)
    assert at_found["kl"] == pytest.approx(target, rel=1e-4)
    assert found == pytest.approx(theory.beta_for_kl(IdentityTransform(), target), rel=0.05)
