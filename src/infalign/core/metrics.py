"""Best-of-N and worst-of-N win rates estimated from samples (math page, section 4).

For one prompt with K policy rewards `a` and L reference rewards `b`, the best-of-N win rate over all
pairs of N-subsets is an exact U-statistic: with `a` sorted ascending, its i-th value (1-based) is the
maximum of a random N-subset with probability `C(i-1, N-1) / C(K, N)`, and it beats the maximum of a
random N-subset of `b` with probability `(C(lt, N) + C(le, N)) / (2 C(L, N))` (ties count half), where
`lt`/`le` count the reference rewards below / at most it. Worst-of-N is `1 - bon(-a, -b)`.
Log-binomials (lgamma) keep K, L in the thousands finite. Pure torch + torchmetrics: no Lightning.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from infalign.core.calibration import check_rewards
from infalign.core.checks import check_mode, check_n

__all__ = ["InferenceTimeWinRate", "bon_win_rate_per_prompt", "won_win_rate_per_prompt", "inference_win_rate_per_prompt",
           "weighted_inference_win_rate_per_prompt", "log_binom", "subset_max_win_probability"]


def log_binom(n: torch.Tensor, k: int) -> torch.Tensor:
    """log C(n, k) elementwise (float64) for integer-valued tensors n; -inf where n < k or k < 0 (the coefficient is 0)."""
    n = n.to(torch.float64)
    if k < 0:
        return torch.full_like(n, float("-inf"))
    out = torch.lgamma(n + 1) - torch.lgamma(torch.tensor(k + 1.0, dtype=torch.float64)) - torch.lgamma(n - k + 1)
    return torch.where(n >= k, out, torch.full_like(n, float("-inf")))


def subset_max_win_probability(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """`[P, K], [P, L] -> [P, K]`: the probability that each value of `a` beats the maximum of a random N-subset of
    its row of `b` (sorted ascending), ties counting half: `(C(lt, N) + C(le, N)) / (2 C(L, N))`."""
    lt = torch.searchsorted(b, a.contiguous(), right=False)
    le = torch.searchsorted(b, a.contiguous(), right=True)
    log_norm = log_binom(torch.tensor(float(b.shape[1])), n)
    return 0.5 * (torch.exp(log_binom(lt, n) - log_norm) + torch.exp(log_binom(le, n) - log_norm))


def _check_n(n, k: int, l: int) -> int:
    n = check_n(n)
    if k < n or l < n:
        raise ValueError(
            f"the N={n} win-rate estimate needs at least N samples per prompt on each side, got K={k} policy "
            f"and L={l} reference samples; sample more (K, L >= N) or lower N"
        )
    return n


def bon_win_rate_per_prompt(policy_rewards, reference_rewards, n: int) -> torch.Tensor:
    """Unbiased best-of-N win rate of the policy against the reference, per prompt: `[P, K], [P, L] -> [P]`."""
    a, b = check_rewards(policy_rewards, reference_rewards)
    n = _check_n(n, a.shape[1], b.shape[1])
    a = a.sort(dim=1).values.contiguous()
    b = b.sort(dim=1).values.contiguous()
    k = a.shape[1]
    rank = torch.arange(k, dtype=torch.float64)  # i - 1 for the i-th smallest
    log_p_max = log_binom(rank, n - 1) - log_binom(torch.tensor(float(k)), n)  # P(a_i is the subset max)
    p_win = subset_max_win_probability(a, b, n)
    p_max = torch.exp(log_p_max)
    p_max = p_max / p_max.sum()  # sums to 1 exactly in theory; renormalising removes lgamma rounding
    return (p_max * p_win).sum(dim=1)


def won_win_rate_per_prompt(policy_rewards, reference_rewards, n: int) -> torch.Tensor:
    """Unbiased worst-of-N win rate (the policy's minimum beats the reference's), per prompt."""
    a, b = check_rewards(policy_rewards, reference_rewards)
    return 1.0 - bon_win_rate_per_prompt(-a, -b, n)


def inference_win_rate_per_prompt(policy_rewards, reference_rewards, n: int, mode: str) -> torch.Tensor:
    fn = bon_win_rate_per_prompt if check_mode(mode) == "bon" else won_win_rate_per_prompt
    return fn(policy_rewards, reference_rewards, n)


def _check_weights(weights, shape: tuple[int, int]) -> torch.Tensor:
    w = torch.as_tensor(weights).to(torch.float64)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"policy_weights must have the policy rewards' shape {tuple(shape)}, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("policy_weights must be finite and non-negative")
    total = w.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("every prompt needs a positive total weight (policy_weights sum to 0 on some row)")
    return w / total


def _weighted_bon(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    order = a.argsort(dim=1)
    a, w = a.gather(1, order).contiguous(), w.gather(1, order)
    b = b.sort(dim=1).values.contiguous()
    # The max of N draws with replacement is at most a_(i) with probability F_w(a_(i))^N: the differences of
    # F^N over the sorted values are its distribution (tied values split one atom between them, and the win
    # probability below depends on the value only, so they need no merging).
    cdf = w.cumsum(dim=1).clamp(max=1.0)
    cdf[:, -1] = 1.0
    p_max = cdf**n - torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1) ** n
    return (p_max * subset_max_win_probability(a, b, n)).sum(dim=1)


def weighted_inference_win_rate_per_prompt(policy_rewards, policy_weights, reference_rewards, n: int,
                                           mode: str) -> torch.Tensor:
    """Best-of-N (`mode="bon"`) or worst-of-N (`"won"`) win rate, per prompt, of a *weighted* sample policy:
    `[P, K]` rewards with `[P, K]` weights against `[P, L]` reference rewards -> `[P]`.

    The policy is the weighted empirical distribution of its K samples (a resampled, soft best-of-K policy):
    its N draws are with replacement, so its maximum has CDF `F_w^N`. The reference side is the same
    U-statistic over N-subsets as `bon_win_rate_per_prompt` (needs L >= N; ties count half); worst-of-N is
    `1 - bon(-a, -b)`. With uniform weights and N = 1 it equals `inference_win_rate_per_prompt`; for N > 1
    uniform weights differ from it (draws with vs without replacement).
    """
    a, b = check_rewards(policy_rewards, reference_rewards)
    n = check_n(n)
    if b.shape[1] < n:
        raise ValueError(f"the N={n} win-rate estimate needs at least N reference samples per prompt, got L={b.shape[1]}")
    w = _check_weights(policy_weights, tuple(a.shape))
    if check_mode(mode) == "bon":
        return _weighted_bon(a, w, b, n)
    return 1.0 - _weighted_bon(-a, w, -b, n)


class InferenceTimeWinRate(Metric):
    """Mean over prompts of the best-of-N (`mode="bon"`) or worst-of-N (`"won"`) win rate; N = 1 is the
    standard win rate. `standard_error()` gives the standard error over prompts.

    States are float64 sums reduced with `sum`, so the result is exact under distributed training. Each
    prompt must be passed once per evaluation (deduplicate repeated prompts before `update`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 1, mode: str = "bon", **kwargs):
        super().__init__(**kwargs)

        self.n = check_n(n)
        self.mode = check_mode(mode)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("win_sum", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("win_sq_sum", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("prompts", default=zero.clone(), dist_reduce_fx="sum")

    def update(self, policy_rewards: torch.Tensor, reference_rewards: torch.Tensor) -> None:
        per_prompt = inference_win_rate_per_prompt(policy_rewards, reference_rewards, self.n, self.mode)
        per_prompt = per_prompt.to(self.win_sum.device)
        self.win_sum += per_prompt.sum()
        self.win_sq_sum += (per_prompt**2).sum()
        self.prompts += per_prompt.numel()

    def compute(self) -> torch.Tensor:
        if self.prompts == 0:
            raise ValueError(f"{type(self).__name__}(n={self.n}, mode={self.mode!r}): compute() before any update()")
        return self.win_sum / self.prompts

    def standard_error(self) -> torch.Tensor:
        """Standard error of the mean over prompts (sample variance, synchronised across processes)."""
        with self.sync_context():
            count = self.prompts.clone()
            if count < 2:
                return torch.tensor(float("nan"), dtype=torch.float64)
            mean = self.win_sum / count
            variance = (self.win_sq_sum - count * mean**2).clamp_min(0.0) / (count - 1)
            return torch.sqrt(variance / count)
