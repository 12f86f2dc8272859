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

__all__ = ["InferenceTimeWinRate", "bon_win_rate_per_prompt", "won_win_rate_per_prompt", "inference_win_rate_per_prompt"]


def _log_binom(n: torch.Tensor, k: int) -> torch.Tensor:
    """log C(n, k) elementwise for integer tensors n >= 0; -inf where n < k."""
    n = n.to(torch.float64)
    out = torch.lgamma(n + 1) - torch.lgamma(torch.tensor(k + 1.0, dtype=torch.float64)) - torch.lgamma(n - k + 1)
    return torch.where(n >= k, out, torch.full_like(n, float("-inf")))


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
    k, l = a.shape[1], b.shape[1]
    lt = torch.searchsorted(b, a, right=False)
    le = torch.searchsorted(b, a, right=True)
    rank = torch.arange(k, dtype=torch.float64)  # i - 1 for the i-th smallest
    log_p_max = _log_binom(rank, n - 1) - _log_binom(torch.tensor(float(k)), n)  # P(a_i is the subset max)
    log_norm = _log_binom(torch.tensor(float(l)), n)
    p_win = 0.5 * (torch.exp(_log_binom(lt, n) - log_norm) + torch.exp(_log_binom(le, n) - log_norm))
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
