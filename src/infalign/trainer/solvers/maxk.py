"""maxk: optimise the best-of-N (worst-of-N) win rate against the reference directly, from k >= N samples a prompt.

CTRL reaches the inference-time objective through a transform of the calibrated reward; this solver takes its
gradient itself (the max@k / pass@k line: PKPO, Walder & Karkhanis, arXiv 2505.15201; Tang et al., arXiv
2503.19595). Each sample's win value h (the chance it beats the reference's best of N, ties half:
`infalign.core.maxk.win_value`, the very convention of `eval/bon_win_rate@N`) comes from the reward model's
score against the calibration cache's M reference scores of its prompt; the advantages are the unbiased
U-statistic estimator of the gradient of E[max of N policy samples' h] (`maxk_advantages`; worst-of-N: the min
mirror). The transform is not used. KL as RLOO's: k1 per sequence in the advantage (leave-one-out centred), or
with `kl_penalty=exact` the full-vocabulary KL of every position (ExactKL's pathwise loss and per-token
advantages). `baseline=auto`: the zero-sum leave-one-out baseline when k >= N+1, else PKPO's loo-1 (k = N).
Cost: k >= N samples per prompt (rl.k); the estimator itself is O(k log k) per prompt. docs/maxk.md.
"""

from __future__ import annotations

import torch

from infalign.core.losses import exact_kl_advantages
from infalign.core.maxk import maxk_advantages, maxk_win_rate, win_value
from infalign.trainer.solvers.exact import ExactKL
from infalign.trainer.solvers.rloo import RLOO

__all__ = ["MaxK"]


class MaxK(RLOO):
    uses_transform = False  # the win rate itself, not Phi(C): the run is judged on `target_metric`, its mode

    def __init__(self, *, n: int, mode: str = "bon", baseline: str = "auto", kl_penalty: str = "reward", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("bon", "won") or kl_penalty not in ("reward", "exact"):
            raise ValueError(f"solver=maxk: mode must be bon or won and kl_penalty reward or exact, got {mode!r}, "
                             f"{kl_penalty!r}")
        self.n, self.mode, self.exact_kl = int(n), mode, kl_penalty == "exact"
        self.target_metric = mode
        self.baseline = baseline if baseline != "auto" else ("loo" if self.k >= self.n + 1 else "loo_minus_one")

    def advantages(self, buffer, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        if buffer.reference_rewards is None:
            raise ValueError("solver=maxk needs the reference's rewards of each prompt: use calibrator=empirical")
        shape = (buffer.prompts, self.k)
        h = win_value(buffer.raw_rewards.view(shape), buffer.reference_rewards, self.n, self.mode)
        buffer.stats[f"reward/maxk_{self.mode}_win_rate"] = maxk_win_rate(h, self.n, self.mode).mean().item()
        if self.exact_kl:  # per token: the estimator's advantage, then beta x (the exact KL to come), centred
            adv = maxk_advantages(h, self.n, self.mode, baseline=self.baseline).flatten()
            kl = buffer.exact_kl.double()
            per_token = exact_kl_advantages(torch.zeros(shape, dtype=torch.float64, device=kl.device), kl, beta)
            return h.flatten() - beta * kl.sum(-1), (adv.to(kl.device)[:, None] + per_token).float()
        k1 = buffer.kl["k1"].double().view(shape)
        adv = maxk_advantages(h, self.n, self.mode, baseline=self.baseline, k1=k1, beta=beta)
        return (h - beta * k1).flatten(), adv.flatten().float()

    def loss(self, module, minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return ExactKL.loss(self, module, minibatch) if self.exact_kl else super().loss(module, minibatch)
