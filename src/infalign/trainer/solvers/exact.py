"""RLOO with the exact KL: the loss holds beta x the full-vocabulary KL(pi || pi_ref) of every visited position
(its pathwise gradient), and each token's advantage is Phi - beta x (the exact KL still to come after it) - the
leave-one-out baseline (the score-function part): together the unbiased gradient of E[Phi] - beta KL, with no
per-sample k1 noise in the advantage (infalign.core.losses.exact_kl_advantages). `algo=ppo` clips as RLOO's."""

from __future__ import annotations

import torch

from infalign.core.losses import exact_kl_advantages, token_kl
from infalign.models.logprobs import response_logprobs
from infalign.trainer.solvers.rloo import RLOO

__all__ = ["ExactKL"]


class ExactKL(RLOO):
    exact_kl = True  # the experience carries the full-vocabulary KL of every visited position

    def advantages(self, buffer, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        # per token: Phi - beta * (exact KL still to come) - leave-one-out baseline
        seq_reward = buffer.rewards.flatten() - beta * buffer.exact_kl.sum(-1).double()
        return seq_reward, exact_kl_advantages(buffer.rewards, buffer.exact_kl.double(), beta).float()

    def loss(self, module, minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        rollout = minibatch.rollout
        logp, logp_all = response_logprobs(module.policy, rollout, full_vocabulary=True)
        with torch.no_grad():
            _, ref_all = response_logprobs(module.reference, rollout, full_vocabulary=True)
        loss, stats = self.policy_loss(logp, minibatch)
        width = logp_all.shape[1]  # the pathwise part of the KL's gradient (the rest is in the advantages)
        kl = token_kl(logp_all, ref_all, rollout.response_mask[:, :width]).sum(-1).mean()
        return loss + self.current_beta() * kl, stats
