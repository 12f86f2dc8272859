"""Direct, unbiased policy gradients of the best-of-N / worst-of-N win rate (max@k / min@k estimators).

CTRL reaches the inference-time objective indirectly, through a transformed calibrated reward. This module
optimises it directly (issue 31): per prompt, k >= N policy samples, and per-sample advantages whose
expectation, times the score function, is the exact gradient of the best-of-N (`mode="bon"`) or worst-of-N
(`mode="won"`) win rate against the reference. Pure torch, no Lightning; shapes `[P, k]` (P prompts, k samples
each) like `core/losses.py`.

**The objective.** For a response y let `h(y)` be its *win value*: the probability that y beats the maximum
(bon) / minimum (won) of N reference responses, ties counting half (math page, section 4). h is a
non-decreasing function of the reward, so the best of N policy samples (highest reward) has the largest h and

    bon_win_rate(pi) = E_{y_1..y_N ~ pi} [ max_j h(y_j) ],    won_win_rate(pi) = E [ min_j h(y_j) ]

(max@N / min@N of h). Two ways to get h:
  * `calibrated_win_value(calibrated_reward, n, mode)`: `h = u^N` (bon) or `1 - (1 - u)^N` (won) from the
    calibrated reward u. Exact when the reward has no ties with the reference (u is then uniform under the
    reference and P(max of N reference u < u) = u^N); the tie-free approximation otherwise.
  * `win_value(policy_rewards, reference_rewards, n, mode)`: the exact win value against the M calibration
    samples, with the project metric's convention (`core/metrics.py`): N-subsets of the reference samples,
    `h = (C(lt, N) + C(le, N)) / (2 C(M, N))` with `lt`/`le` the reference rewards below / at most the
    sample's reward (ties count half); won is `1 - h_bon(-r, -b)`. With these values the U-statistic
    `maxk_win_rate` equals `bon_win_rate_per_prompt` / `won_win_rate_per_prompt` (`eval/bon_win_rate@N`)
    on the same samples, exactly, ties included. The discrete calibrated reward
    `C = (lt + eq/2)/M` does not determine `(lt, le)`, so with ties only this form matches the metric.
  Ties *among the policy's own samples* need no convention: tied samples have equal h, so the max (min) of a
  subset has the same value whichever tied sample attains it, and tied samples get equal advantages.

**The estimator** (the U-statistic over the C(k, N) N-subsets of the k samples: Walder & Karkhanis, "Pass@K
Policy Optimization", arXiv 2505.15201, the maxg@k estimator; Tang et al., arXiv 2503.19595). The gradient
of E[max_S h] is E[max_S h * sum_{j in S} grad log pi(y_j)]; averaging over all N-subsets S of the k samples,

    grad W ~ sum_i s_i grad log pi(y_i),   s_i = (1/C(k,N)) sum_{S contains i} max_S h.

With h sorted ascending, h_(1) <= ... <= h_(k) (1-based positions), the closed form is

    C(k,N) s_(p) = C(p-1, N-1) h_(p) + sum_{j > p} C(j-2, N-2) h_(j)

(the subsets whose maximum is p itself, and those whose maximum is a higher j), O(k log k) for the sort.
A baseline b_i that does not depend on y_i keeps it unbiased (E[b_i grad log pi(y_i)] = 0):
  * `baseline="loo"` (default, needs k >= N+1): b_i = (N/k) U_{-i}^{(N)}, the U-statistic of max@N over the
    other k-1 samples, scaled. It equals the subset-wise baseline "replace i in each subset by each sample
    outside it, and average" (each N-subset of the others arises N times). The advantages then SUM TO ZERO
    per prompt (sum_i s_i = N U = sum_i b_i), like RLOO. It is the only baseline of the form f(y_{-i}),
    f symmetric, that does: if sum_i g(y_{-i}) = 0 for all samples, filling the arguments with one value and
    inducting on the number of other values gives g = 0.
  * `baseline="loo_minus_one"` (our reading of PKPO's "loo-1" variant; needs N >= 2, any k >= N):
    b_i = (N/k) U_{-i}^{(N-1)}, i.e. for each subset containing i, the max of its other N-1 members;
    s_i - b_i averages (h_i - max_{S\\i} h)_+, so every advantage is >= 0 (<= 0 for won) and they do NOT
    sum to zero (their sum is N (U^(N) - mean_i U_{-i}^(N-1)) >= 0). Lower variance than `loo` in most
    cells of docs/maxk.md's enumerated table. With `none`, the only choice when k == N: no zero-sum
    baseline exists then (sum_i b_i(y_{-i}) = N max h has no solution for N >= 2).
  * `baseline="none"`: b_i = 0 (any k >= N); does not sum to zero.
`maxk_centered(n, k, baseline)` says which; the tests check exactly that claim. (Takashiro et al., "On
Advantage Estimates for Max@K Policy Gradients", arXiv 2606.06080, propose a centred "leave-two-out"
estimator in quadratic time; not implemented or compared here.)

**Scale.** The returned advantages are `A_i = k (s_i - b_i)`, so that, like RLOO's, the *mean* over samples
`(1/k) sum_i A_i grad log pi(y_i)` (what `rloo_loss` / `ppo_clip_loss` compute) is unbiased for grad W.
W is in [0, 1] like the [0, 1]-normalised transforms, so beta is on the other solvers' scale. For N = 1
(both modes) `A_i = h_i - mean_{j != i} h_j` is RLOO on the calibrated reward (`h = u`).
Worst-of-N is the min@k mirror: `A(won, h) = -A(bon, -h)`.

**KL.** As the other solvers with `kl_penalty=reward`: pass the per-sequence k1 (`sequence_kl(...)["k1"]`) and
beta, and `A_i -= beta * (k1_i - mean_{j != i} k1_j)` (RLOO on k1, sums to zero, unbiased for grad KL).
For `kl_penalty=exact`, pass no k1 and add per-token terms:
`A[:, None] + exact_kl_advantages(torch.zeros_like(values), kl, beta)` (that is `beta * mean_{j!=i} KL_j -
beta * G_t`), with `token_kl` in the loss as the other solvers do.
"""

from __future__ import annotations

import math

import torch

from infalign.core.calibration import check_rewards
from infalign.core.checks import check_mode, check_n
from infalign.core.losses import rloo_advantages
from infalign.core.metrics import log_binom, subset_max_win_probability

__all__ = [
    "MAXK_BASELINES",
    "calibrated_win_value",
    "win_value",
    "maxk_advantages",
    "maxk_win_rate",
    "maxk_centered",
]

MAXK_BASELINES = ("loo", "loo_minus_one", "none")


def _check_values(values, name: str = "win_value") -> torch.Tensor:
    v = torch.as_tensor(values)
    if v.dim() != 2:
        raise ValueError(f"{name} must be a 2-D table [prompts, samples], got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        v = v.to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    return v


def calibrated_win_value(calibrated_reward, n: int, mode: str = "bon") -> torch.Tensor:
    """The tie-free win value from the calibrated reward u in [0, 1]: `u^N` (bon), `1 - (1 - u)^N` (won).
    `[P, k] -> [P, k]`, same dtype. Exact when the reward never ties the reference; see the module docstring."""
    u = _check_values(calibrated_reward, "calibrated_reward")
    n, mode = check_n(n), check_mode(mode)
    if bool((u < 0).any()) or bool((u > 1).any()):
        raise ValueError("calibrated_reward must lie in [0, 1]")
    return u**n if mode == "bon" else 1.0 - (1.0 - u) ** n


def win_value(policy_rewards, reference_rewards, n: int, mode: str = "bon") -> torch.Tensor:
    """The exact win value of each policy sample against a prompt's M reference (calibration) samples, with the
    metric's conventions (N-subsets of the reference, ties count half): `[P, k], [P, M] -> [P, k]` float64.
    bon: P(reward > max of a random N-subset of the reference) + 1/2 P(=); won: the same against the minimum.
    Needs M >= N."""
    a, b = check_rewards(policy_rewards, reference_rewards)
    n, mode = check_n(n), check_mode(mode)
    if b.shape[1] < n:
        raise ValueError(f"the N={n} win value needs at least N reference samples per prompt, got M={b.shape[1]}")
    if mode == "bon":
        return subset_max_win_probability(a, b.sort(dim=1).values.contiguous(), n)
    return 1.0 - subset_max_win_probability(-a, (-b).sort(dim=1).values.contiguous(), n)


def maxk_centered(n: int, k: int, baseline: str = "loo") -> bool:
    """Whether `maxk_advantages(..., baseline=baseline)` sums to zero per prompt for every input (the k1 term
    always does): only the leave-one-out U-statistic baseline (k >= N+1)."""
    _check_shape(check_n(n), k, baseline)
    return baseline == "loo"


def _check_shape(n: int, k: int, baseline: str) -> None:
    if baseline not in MAXK_BASELINES:
        raise ValueError(f"baseline must be one of {MAXK_BASELINES}, got {baseline!r}")
    if k < n:
        raise ValueError(f"the max@N estimator needs k >= N samples per prompt, got k={k} for N={n}; raise k or lower N")
    if baseline == "loo" and k < n + 1:
        raise ValueError(
            f"baseline='loo' leaves one sample out and needs k >= N+1 samples per prompt, got k={k} for N={n}; "
            "raise k or use baseline='loo_minus_one' (N >= 2) or 'none'"
        )
    if baseline == "loo_minus_one" and n < 2:
        raise ValueError("baseline='loo_minus_one' needs N >= 2 (for N = 1 use 'loo', which is RLOO)")


def _leave_one_out_max(h: torch.Tensor, m: int) -> torch.Tensor:
    """For h sorted ascending `[P, k]`: U_{-p}^{(m)}, the mean over the m-subsets of the other k-1 samples of
    their maximum, for every position p. Position j < p keeps rank j among the others, j > p has rank j-1."""
    k = h.shape[1]
    j = torch.arange(1, k + 1, dtype=torch.float64, device=h.device)
    log_norm = log_binom(torch.tensor(float(k - 1)), m).item()
    below = torch.exp(log_binom(j - 1, m - 1) - log_norm) * h  # sample j is below p: the max with rank j
    above = torch.exp(log_binom(j - 2, m - 1) - log_norm) * h  # sample j is above p: rank j-1
    prefix = below.cumsum(1) - below  # sum over j < p
    suffix = above.flip(1).cumsum(1).flip(1) - above  # sum over j > p
    return prefix + suffix


def _bon_scores(h: torch.Tensor, n: int, baseline: str) -> torch.Tensor:
    """k (s_i - b_i) for max@N of h (`[P, k]` float64), in the original sample order."""
    p_count, k = h.shape
    hs, order = h.sort(dim=1, stable=True)
    j = torch.arange(1, k + 1, dtype=torch.float64, device=h.device)
    log_norm = log_binom(torch.tensor(float(k)), n).item()
    own = k * torch.exp(log_binom(j - 1, n - 1) - log_norm) * hs  # subsets whose max is p itself
    higher = k * torch.exp(log_binom(j - 2, n - 2) - log_norm) * hs  # subsets with p whose max is j > p
    scores = own + (higher.flip(1).cumsum(1).flip(1) - higher)
    if baseline == "loo":
        scores = scores - n * _leave_one_out_max(hs, n)
    elif baseline == "loo_minus_one":
        scores = scores - n * _leave_one_out_max(hs, n - 1)
    return torch.empty_like(scores).scatter_(1, order, scores)


def maxk_advantages(
    win_values,
    n: int,
    mode: str = "bon",
    *,
    baseline: str = "loo",
    k1=None,
    beta: float = 0.0,
) -> torch.Tensor:
    """Per-sample advantages for the gradient of the best-of-N (`mode="bon"`) / worst-of-N (`"won"`) win rate
    minus `beta * KL(pi || pi_ref)`: `[P, k] -> [P, k]` (the input's floating dtype; computed in float64).

    `win_values`: per-sample win values h (`calibrated_win_value(calibrated_reward, n, mode)`, or the exact
    `win_value(policy_rewards, reference_rewards, n, mode)`), k >= N samples per prompt (k >= N+1 for the
    default `baseline="loo"`). `k1`: optional `[P, k]` per-sequence k1 KL estimates (`kl_penalty=reward`).
    Returns `A` with `mean_i A_i grad log pi(y_i)` unbiased for `grad (W - beta KL)`; feed it to `rloo_loss`
    or `ppo_clip_loss` like RLOO advantages. Formulas, ties, centring: the module docstring.
    """
    h = _check_values(win_values)
    n, mode = check_n(n), check_mode(mode)
    _check_shape(n, h.shape[1], baseline)
    if isinstance(beta, bool) or not math.isfinite(float(beta)) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    h64 = h.to(torch.float64)
    adv = _bon_scores(h64, n, baseline) if mode == "bon" else -_bon_scores(-h64, n, baseline)
    if k1 is not None:
        kl = _check_values(k1, "k1").to(torch.float64).to(h.device)
        if kl.shape != h.shape:
            raise ValueError(f"k1 must have the win values' shape {tuple(h.shape)}, got {tuple(kl.shape)}")
        adv = adv - beta * (rloo_advantages(kl) if kl.shape[1] >= 2 else kl)
    elif beta > 0:
        raise ValueError("beta > 0 needs the per-sequence k1 (kl_penalty=reward); for kl_penalty=exact pass beta=0 "
                         "and add exact_kl_advantages(torch.zeros_like(values), kl, beta) per token")
    return adv.to(h.dtype)


def maxk_win_rate(win_values, n: int, mode: str = "bon") -> torch.Tensor:
    """The unbiased U-statistic estimate of the win rate from k >= N samples' win values: `[P, k] -> [P]`
    (mean over the N-subsets of their max (bon) / min (won) of h). With `win_value(...)` it equals the
    project's `bon_win_rate_per_prompt` / `won_win_rate_per_prompt` on the same samples; for logging."""
    h = _check_values(win_values).to(torch.float64)
    n, mode = check_n(n), check_mode(mode)
    k = h.shape[1]
    if k < n:
        raise ValueError(f"the max@N estimate needs k >= N samples per prompt, got k={k} for N={n}")
    sign = 1.0 if mode == "bon" else -1.0
    hs = (sign * h).sort(dim=1).values
    j = torch.arange(1, k + 1, dtype=torch.float64, device=h.device)
    p_max = torch.exp(log_binom(j - 1, n - 1) - log_binom(torch.tensor(float(k)), n).item())
    return sign * (p_max * hs).sum(1)
