"""Distillation: fit the optimal tilt directly, by maximum likelihood on reference samples drawn by weight.

Each iteration reads, for each of its prompts, `samples_per_prompt` samples of the distillation pool (reference
samples of the training prompts, their own cache entry) drawn with replacement by w ∝ exp(Phi(C) / beta)
(`RolloutBuilder.pool_draw`), and takes maximum-likelihood steps on them: no sampling from the policy and no
policy-gradient noise. The target is the tilted reference the pool represents (soft best-of-M).
"""

from __future__ import annotations

import torch

from infalign.models.logprobs import response_logprobs
from infalign.trainer.solvers.base import Experience, Solver

__all__ = ["Distill"]


class Distill(Solver):
    loss_key = "distill/nll"

    def __init__(self, *, beta: float, samples_per_prompt: int, minibatch_size: int, prompts_per_iteration: int,
                 grad_clip: float | None = 1.0):
        super().__init__(beta=beta, minibatch_size=minibatch_size, grad_clip=grad_clip,
                         prompts_per_iteration=prompts_per_iteration)
        self.samples_per_prompt = int(samples_per_prompt)

    def experience(self, iteration: int) -> Experience:
        return Experience("pool", samples_per_prompt=self.samples_per_prompt, beta=self.beta)

    def loss(self, module, minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        # the negative log-likelihood per sequence
        return -response_logprobs(module.policy, minibatch.rollout).sum(-1).mean(), {}
