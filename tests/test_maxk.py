"""The max@k / min@k estimator of the best-/worst-of-N win rate's gradient (core/maxk.py, issue 31)."""

import itertools
import math

import pytest
import torch

from infalign.core.losses import rloo_advantages
from infalign.core.maxk import (
    calibrated_win_value,
    maxk_advantages,
    maxk_centered,
    maxk_win_rate,
    win_value,
)
from infalign.core.metrics import inference_win_rate_per_prompt, weighted_inference_win_rate_per_prompt

# one prompt, four responses: rewards tie within the policy's responses and with the reference samples
REWARDS = torch.tensor([[0.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
REFERENCE = torch.tensor([[0.0, 1.0, 1.0, 2.0, 0.5, 1.0, 3.0]], dtype=torch.float64)  # M = 7 >= N


def _baselines(n, k):
    out = ["none"]
    if k >= n + 1:
        out.append("loo")
    if n >= 2:
        out.append("loo_minus_one")
    return out


CASES = [(n, k, mode, b) for n in (1, 2, 4) for k in (n, n + 1, n + 3) for mode in ("bon", "won") for b in _baselines(n, k)]


def _exact_objective(theta, ref_logp, h, n, mode, beta):
    """W(pi) - beta KL(pi || pi_ref) by enumerating every N-tuple of responses (autograd-able)."""
    logp = torch.log_softmax(theta, -1)
    agg = torch.max if mode == "bon" else torch.min
    w = torch.zeros((), dtype=torch.float64)
    for tup in itertools.product(range(theta.numel()), repeat=n):
        idx = torch.tensor(tup)
        w = w + logp[idx].sum().exp() * agg(h[idx])
    kl = (logp.exp() * (logp - ref_logp)).sum()
    return w, w - beta * kl


@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("n,k,mode,baseline", CASES)
def test_expected_estimator_equals_brute_force_gradient(n, k, mode, baseline, beta):
    gen = torch.Generator().manual_seed(1000 * n + 10 * k + len(baseline))
    theta = torch.randn(4, generator=gen, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(4, generator=gen, dtype=torch.float64), -1)
    h = win_value(REWARDS, REFERENCE, n, mode)[0]  # the metric's per-response win value (ties count half)

    # exact gradient of the win rate (minus beta KL) w.r.t. the softmax logits
    th = theta.clone().requires_grad_(True)
    w, objective = _exact_objective(th, ref_logp, h, n, mode, beta)
    (want,) = torch.autograd.grad(objective, th)
    # the enumerated win rate is the project's metric for this (i.i.d. sampling) policy
    pi = torch.softmax(theta, -1)
    metric = weighted_inference_win_rate_per_prompt(REWARDS, pi[None], REFERENCE, n, mode)
    assert w.item() == pytest.approx(metric.item(), abs=1e-12)

    # exact expectation of the estimator: every k-tuple of samples, weighted by its probability
    logp = torch.log_softmax(theta, -1)
    tuples = torch.tensor(list(itertools.product(range(4), repeat=k)))  # [T, k]
    prob = logp[tuples].sum(1).exp()
    adv = maxk_advantages(h[tuples], n, mode, baseline=baseline, k1=(logp - ref_logp)[tuples], beta=beta)
    # (1/k) sum_i A_i grad log pi(y_i), grad_theta log softmax(theta)[y] = onehot(y) - pi
    onehot = torch.nn.functional.one_hot(tuples, 4).to(torch.float64)  # [T, k, 4]
    per_tuple = ((adv / k).unsqueeze(-1) * (onehot - pi)).sum(1)
    got = (prob.unsqueeze(-1) * per_tuple).sum(0)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got, want)
    assert want.abs().max() > 1e-3  # a non-trivial gradient


def test_a_biased_baseline_fails_the_brute_force_check():
    """The check can fail: a baseline that uses y_i itself (the prompt mean, GRPO-style) is biased."""
    n, k, mode = 2, 3, "bon"
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    h = win_value(REWARDS, REFERENCE, n, mode)[0]
    th = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(_exact_objective(th, torch.zeros(4, dtype=torch.float64), h, n, mode, 0.0)[0], th)
    pi = torch.softmax(theta, -1)
    tuples = torch.tensor(list(itertools.product(range(4), repeat=k)))
    prob = pi[tuples].prod(1)
    adv = maxk_advantages(h[tuples], n, mode, baseline="none")
    adv = adv - adv.mean(1, keepdim=True)
    onehot = torch.nn.functional.one_hot(tuples, 4).to(torch.float64)
    got = (prob.unsqueeze(-1) * ((adv / k).unsqueeze(-1) * (onehot - pi)).sum(1)).sum(0)
    assert not torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["bon", "won"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_closed_form_equals_subset_enumeration(n, mode):
    gen = torch.Generator().manual_seed(n)
    k = n + 3
    h = torch.randint(0, 4, (3, k), generator=gen).to(torch.float64) / 4  # ties
    agg = max if mode == "bon" else min
    for baseline in _baselines(n, k):
        adv = maxk_advantages(h, n, mode, baseline=baseline)
        for p in range(3):
            for i in range(k):
                subsets = [s for s in itertools.combinations(range(k), n) if i in s]
                s_i = sum(agg(h[p, j].item() for j in s) for s in subsets) / math.comb(k, n)
                others = [j for j in range(k) if j != i]
                m = {"loo": n, "loo_minus_one": n - 1, "none": 0}[baseline]
                b_i = 0.0
                if m:
                    sub = list(itertools.combinations(others, m))
                    b_i = n / k * sum(agg(h[p, j].item() for j in s) for s in sub) / len(sub)
                assert adv[p, i].item() == pytest.approx(k * (s_i - b_i), abs=1e-12)


@pytest.mark.parametrize("mode", ["bon", "won"])
@pytest.mark.parametrize("n,k", [(1, 1), (1, 2), (1, 5), (2, 2), (2, 3), (2, 6), (4, 4), (4, 5), (4, 9), (8, 16)])
def test_advantages_sum_to_zero_exactly_when_the_estimator_says_so(n, k, mode):
    gen = torch.Generator().manual_seed(10 * n + k)
    u = torch.rand(64, k, generator=gen, dtype=torch.float64)
    h = calibrated_win_value(u, n, mode)
    k1 = torch.randn(64, k, generator=gen, dtype=torch.float64) if k >= 2 else None
    for baseline in ("loo", "loo_minus_one", "none"):
        try:
            centered = maxk_centered(n, k, baseline)
        except ValueError:
            with pytest.raises(ValueError):
                maxk_advantages(h, n, mode, baseline=baseline)
            continue
        for kl in (None, k1):
            adv = maxk_advantages(h, n, mode, baseline=baseline, k1=kl, beta=0.2 if kl is not None else 0.0)
            sums = adv.sum(1)
            if centered:
                assert sums.abs().max() < 1e-12
            else:  # generic continuous values: every prompt's sum is away from zero
                assert sums.abs().min() > 1e-9
    assert maxk_centered(n, k, "none") is False
    if k >= n + 1:
        assert maxk_centered(n, k, "loo") is True


def test_loo_minus_one_advantages_are_non_negative():
    u = torch.rand(32, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for mode in ("bon", "won"):
        adv = maxk_advantages(calibrated_win_value(u, 3, mode), 3, mode, baseline="loo_minus_one")
        assert (adv >= -1e-12).all() if mode == "bon" else (adv <= 1e-12).all()
        assert adv.abs().max() > 0.1


@pytest.mark.parametrize("mode", ["bon", "won"])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_n1_is_rloo_on_the_calibrated_reward(k, mode):
    gen = torch.Generator().manual_seed(k)
    u = torch.rand(5, k, generator=gen, dtype=torch.float64)
    u[:, 0] = u[:, 1]  # a tie
    k1 = torch.randn(5, k, generator=gen, dtype=torch.float64)
    assert torch.allclose(calibrated_win_value(u, 1, mode), u, rtol=0, atol=1e-15)
    got = maxk_advantages(calibrated_win_value(u, 1, mode), 1, mode, k1=k1, beta=0.1)
    assert torch.allclose(got, rloo_advantages(u - 0.1 * k1), rtol=0, atol=1e-14)
    assert torch.allclose(maxk_advantages(u, 1, mode), rloo_advantages(u), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["bon", "won"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_win_value_u_statistic_is_the_reported_metric(n, mode):
    gen = torch.Generator().manual_seed(n)
    a = torch.randint(0, 6, (6, 7), generator=gen).to(torch.float64)  # ties within and across sides
    b = torch.randint(0, 6, (6, 9), generator=gen).to(torch.float64)
    got = maxk_win_rate(win_value(a, b, n, mode), n, mode)
    assert torch.allclose(got, inference_win_rate_per_prompt(a, b, n, mode), rtol=0, atol=1e-12)
    # without ties against the reference, the win value is the calibrated reward's u^N / 1-(1-u)^N in the
    # limit of many reference samples: here, exactly, with the reference a fine grid and N = 1
    u = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5)[None].expand(3, -1) / 10_000
    for m in (1, 3):
        assert torch.allclose(win_value(u, grid, m, mode), calibrated_win_value(u, m, mode), atol=2e-3)


def test_bad_inputs_are_refused():
    u = torch.rand(2, 4)
    with pytest.raises(ValueError, match="k >= N"):
        maxk_advantages(u, 5)
    with pytest.raises(ValueError, match="k >= N\\+1"):
        maxk_advantages(u, 4)
    with pytest.raises(ValueError, match="N >= 2"):
        maxk_advantages(u, 1, baseline="loo_minus_one")
    with pytest.raises(ValueError, match="baseline"):
        maxk_advantages(u, 2, baseline="mean")
    with pytest.raises(ValueError, match="k1"):
        maxk_advantages(u, 2, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        maxk_advantages(u, 2, k1=torch.zeros(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="mode"):
        maxk_advantages(u, 2, "worst")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibrated_win_value(u + 1, 2)
    with pytest.raises(ValueError, match="non-finite"):
        maxk_advantages(torch.tensor([[0.1, float("nan"), 0.3]]), 2)
    assert maxk_advantages(u, 2).dtype == torch.float32


# --- a tabular toy: softmax policies over a fixed response set per prompt, no language model ---------------------


def _population_win_value(r, ref_pi, n, mode):
    """The exact win value of each response against N i.i.d. reference draws (ties count half): `[P, R]`."""
    below = (ref_pi.unsqueeze(1) * (r.unsqueeze(1) < r.unsqueeze(2))).sum(-1)  # [p, y]: P_ref(r_z < r_y)
    at_most = (ref_pi.unsqueeze(1) * (r.unsqueeze(1) <= r.unsqueeze(2))).sum(-1)
    if mode == "bon":
        return 0.5 * (below**n + at_most**n)
    return 1.0 - 0.5 * ((1.0 - at_most) ** n + (1.0 - below) ** n)


def _exact_win_rate(pi, r, h, n, mode):
    """E over N i.i.d. policy draws of max (min) h, per prompt: h is non-decreasing in r, so by value groups."""
    below = (pi.unsqueeze(1) * (r.unsqueeze(1) < r.unsqueeze(2))).sum(-1)  # P_pi(r_z < r_y)
    at_most = (pi.unsqueeze(1) * (r.unsqueeze(1) <= r.unsqueeze(2))).sum(-1)
    if mode == "bon":
        p_extreme = at_most**n - below**n  # P(max of N has y's value)
    else:
        p_extreme = (1.0 - below) ** n - (1.0 - at_most) ** n
    group = (r.unsqueeze(1) == r.unsqueeze(2)).to(pi.dtype) @ pi.unsqueeze(-1)  # P_pi(value of y)
    share = pi / group.squeeze(-1)  # split the group's probability among its members
    return (p_extreme * share * h).sum(-1)


def _train(mode, beta, steps=300, n=4, k=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p_count, responses = 16, 10
    r = torch.randint(0, 8, (p_count, responses), generator=gen).to(torch.float64)  # ties
    ref_logits = 0.5 * torch.randn(p_count, responses, generator=gen, dtype=torch.float64)
    ref_pi, ref_logp = torch.softmax(ref_logits, -1), torch.log_softmax(ref_logits, -1)
    h = _population_win_value(r, ref_pi, n, mode)
    theta = ref_logits.clone()
    start = _exact_win_rate(ref_pi, r, h, n, mode).mean().item()
    for _ in range(steps):
        pi, logp = torch.softmax(theta, -1), torch.log_softmax(theta, -1)
        y = torch.multinomial(pi, k, replacement=True, generator=gen)  # [P, k]
        k1 = (logp - ref_logp).gather(1, y)
        adv = maxk_advantages(h.gather(1, y), n, mode, k1=k1, beta=beta)
        onehot = torch.nn.functional.one_hot(y, responses).to(torch.float64)
        grad = ((adv / k).unsqueeze(-1) * (onehot - pi.unsqueeze(1))).sum(1)  # per prompt
        theta = theta + 2.0 * grad
    pi, logp = torch.softmax(theta, -1), torch.log_softmax(theta, -1)
    end = _exact_win_rate(pi, r, h, n, mode).mean().item()
    kl = (pi * (logp - ref_logp)).sum(-1).mean().item()
    optimum = h.max(-1).values.mean().item()  # a point mass on the response with the highest win value
    return start, end, kl, optimum


@pytest.mark.parametrize("mode", ["bon", "won"])
def test_tabular_toy_moves_toward_the_best_of_n_optimum_and_kl_holds_it_near_the_reference(mode):
    start, free, kl_free, optimum = _train(mode, beta=0.0)
    _, held, kl_held, _ = _train(mode, beta=0.05)
    assert start == pytest.approx(0.5, abs=1e-12)  # pi = pi_ref: a fair game
    # without KL the optimum is a point mass on each prompt's top response: W* = mean max h (0.738 for bon
    # here, where rewards tie at the top; 0.999 for won)
    assert free > 0.7, (start, free)
    assert (free - start) > 0.95 * (optimum - start), (start, free, optimum)
    assert held > 0.6, (start, held)
    assert kl_held < 0.6 * kl_free, (kl_held, kl_free)
