"""RLOO (and PPO-clip): the policy gradient of E[Phi(C)] - beta KL on the policy's own samples.

Each sequence's reward is R = Phi(C) - beta * KL_k1 (its k1 estimate against the frozen reference), its advantage
R minus the mean of the prompt's other samples' (the leave-one-out baseline). `algo=rloo`: one pass of REINFORCE
minibatch steps over the rollout; `algo=ppo`: `ppo_epochs` passes of PPO's clipped objective. With `target_kl`,
beta adapts towards it (AdaptiveKLController, checkpointed); `grad_noise_scale` estimates the gradient noise
scale from the first pass's minibatch gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from infalign.core.losses import (
    AdaptiveKLController,
    GradientNoiseScale,
    ppo_clip_loss,
    rloo_advantages,
    rloo_loss,
)
from infalign.models.logprobs import response_logprobs
from infalign.models.lora import update_passes
from infalign.trainer.solvers.base import Experience, Solver

__all__ = ["RLOO"]

ALGOS = ("rloo", "ppo")


class RLOO(Solver):
    exact_kl = False  # the experience's KL: k1 per sequence (ExactKL: the full-vocabulary KL per position)

    def __init__(self, *, beta: float, k: int, minibatch_size: int, prompts_per_iteration: int, algo: str = "rloo",
                 ppo_epochs: int = 2, clip: float = 0.2, grad_clip: float | None = 1.0, target_kl: float | None = None,
                 grad_noise_scale: bool = True):
        super().__init__(beta=beta, minibatch_size=minibatch_size, grad_clip=grad_clip,
                         prompts_per_iteration=prompts_per_iteration)
        if algo not in ALGOS:
            raise ValueError(f"rl.algo must be 'rloo' or 'ppo', got {algo!r}")
        self.k, self.algo, self.ppo_epochs, self.clip = int(k), algo, int(ppo_epochs), float(clip)
        self.kl_controller = AdaptiveKLController(self.beta, target_kl) if target_kl else None
        self.noise_scale = GradientNoiseScale() if grad_noise_scale else None

    def current_beta(self) -> float:
        return self.kl_controller.beta if self.kl_controller else self.beta

    def experience(self, iteration: int) -> Experience:
        return Experience("rollout", k=self.k, exact_kl=self.exact_kl)

    def passes(self) -> int:
        return self.ppo_epochs if self.algo == "ppo" else 1

    def advantages(self, buffer, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(each sequence's total reward [S], its advantage [S] or per token [S, T])."""
        seq_reward = buffer.rewards.flatten() - beta * buffer.kl["k1"].double()  # R = Phi(C) - beta * KL_k1
        return seq_reward, rloo_advantages(seq_reward.view(buffer.prompts, self.k)).flatten().float()

    def step(self, module, buffer) -> dict[str, float]:
        beta = self.current_beta()
        seq_reward, buffer.advantages = self.advantages(buffer, beta)
        stats = {**buffer.stats, "reward/total": seq_reward.mean().item(), "beta": beta}
        with update_passes(module.policy):  # gradient checkpointing and LoRA's dropout: in the update's passes only
            return stats | self.minibatch_steps(module, buffer, noise=self.noise_scale)

    def loss(self, module, minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.policy_loss(response_logprobs(module.policy, minibatch.rollout), minibatch)

    def policy_loss(self, logp: torch.Tensor, minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """REINFORCE's loss on the minibatch's advantages, or with algo=ppo the clipped surrogate."""
        if self.algo == "ppo":
            loss, clip_frac = ppo_clip_loss(logp, minibatch.old_logp, minibatch.rollout.response_mask,
                                            minibatch.advantages, self.clip)
            return loss, {"policy/clip_fraction": clip_frac.item()}
        return rloo_loss(logp, minibatch.rollout.response_mask, minibatch.advantages), {}

    def end_iteration(self, stats: Mapping[str, float], sequences: int, iteration: int) -> None:
        if self.kl_controller:  # all sequences of all processes
            self.kl_controller.update(stats["kl/k1"], n_steps=sequences)

    def state_dict(self) -> dict:
        return {**({"kl_controller": self.kl_controller.state_dict()} if self.kl_controller else {}),
                **({"grad_noise_scale": self.noise_scale.state_dict()} if self.noise_scale else {})}

    def load_state_dict(self, state: Mapping) -> None:
        if self.kl_controller and "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        if self.noise_scale and "grad_noise_scale" in state:
            self.noise_scale.load_state_dict(state["grad_noise_scale"])
