import itertools
import math

import numpy as np
import pytest
import torch

from infalign.core.metrics import InferenceTimeWinRate, bon_win_rate_per_prompt, won_win_rate_per_prompt


def brute(a, b, n, mode):
    """Average over every pair of N-subsets (ties count half)."""
    agg = max if mode == "bon" else min
    total, count = 0.0, 0
    for sa in itertools.combinations(a, n):
        for sb in itertools.combinations(b, n):
            x, y = agg(sa), agg(sb)
            total += 1.0 if x > y else 0.5 if x == y else 0.0
            count += 1
    return total / count


@pytest.mark.parametrize("mode", ["bon", "won"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_u_statistic_equals_enumeration_of_subset_pairs(n, mode):
    rng = np.random.default_rng(n)
    a = rng.integers(0, 6, size=(4, 6)).astype(float)  # ties within and across sides
    b = rng.integers(0, 6, size=(4, 5)).astype(float)
    fn = bon_win_rate_per_prompt if mode == "bon" else won_win_rate_per_prompt
    got = fn(torch.tensor(a), torch.tensor(b), n).numpy()
    want = [brute(ai, bi, n, mode) for ai, bi in zip(a, b)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_identical_distributions_give_one_half_and_sides_are_complementary():
    torch.manual_seed(0)
    a, b = torch.randn(3, 10), torch.randn(3, 12)
    for n in (1, 2, 5):
        fwd, back = bon_win_rate_per_prompt(a, b, n), bon_win_rate_per_prompt(b, a, n)
        assert torch.allclose(fwd + back, torch.ones(3, dtype=torch.float64))
    same = torch.full((1, 4), 2.0)
    assert bon_win_rate_per_prompt(same, same, 3).item() == pytest.approx(0.5)


def test_large_k_and_l_are_finite_and_match_closed_form():
    # Policy = reference distribution: the expectation is exactly 1/2 for continuous rewards.
    torch.manual_seed(0)
    a, b = torch.rand(2, 3000), torch.rand(2, 2500)
    for n in (1, 8, 64):
        w = bon_win_rate_per_prompt(a, b, n)
        assert torch.isfinite(w).all()
        assert (w - 0.5).abs().max() < 0.1
    # a policy that always beats the reference wins with probability 1
    assert bon_win_rate_per_prompt(a + 2, b, 64).tolist() == [1.0, 1.0]


def test_metric_mean_and_standard_error():
    torch.manual_seed(0)
    a, b = torch.randn(10, 6) + 0.3, torch.randn(10, 6)
    per_prompt = bon_win_rate_per_prompt(a, b, 2)
    metric = InferenceTimeWinRate(n=2, mode="bon")
    metric.update(a[:4], b[:4])
    metric.update(a[4:], b[4:])  # states accumulate over batches
    assert metric.compute().item() == pytest.approx(per_prompt.mean().item())
    assert metric.standard_error().item() == pytest.approx(per_prompt.std().item() / math.sqrt(10))
    metric.reset()
    metric.update(a, b)
    assert metric.compute().item() == pytest.approx(per_prompt.mean().item())


def test_metric_states_reduce_by_sum():
    metric = InferenceTimeWinRate(n=4, mode="won")
    assert all(metric._reductions[k] is not None for k in ("win_sum", "win_sq_sum", "prompts"))
    assert metric._reductions["prompts"].__name__.endswith("sum")


def test_merged_states_equal_single_pass():
    # What DDP's sum-reduction does: two ranks' states merged equal one pass over all prompts.
    torch.manual_seed(2)
    a, b = torch.randn(8, 5), torch.randn(8, 7)
    whole, r0, r1 = (InferenceTimeWinRate(n=3, mode="won") for _ in range(3))
    whole.update(a, b)
    r0.update(a[:3], b[:3])
    r1.update(a[3:], b[3:])
    r0.merge_state(r1)
    assert r0.compute().item() == pytest.approx(whole.compute().item())
    assert r0.standard_error().item() == pytest.approx(whole.standard_error().item())


@pytest.mark.parametrize(
    "kwargs, a, b, match",
    [
        ({"n": 0}, None, None, "n must be >= 1"),
        ({"n": 2.5}, None, None, "positive integer"),
        ({"n": 2, "mode": "median"}, None, None, "mode must be one of"),
        ({"n": 4}, torch.zeros(2, 3), torch.zeros(2, 8), "K=3"),
        ({"n": 4}, torch.zeros(2, 8), torch.zeros(2, 3), "L=3"),
        ({"n": 1}, torch.zeros(2, 3), torch.zeros(1, 3), "same prompts"),
        ({"n": 1}, torch.tensor([[float("nan")]]), torch.zeros(1, 1), "non-finite"),
    ],
)
def test_bad_input(kwargs, a, b, match):
    with pytest.raises(ValueError, match=match):
        metric = InferenceTimeWinRate(**kwargs)
        metric.update(a, b)
