"""`sample_and_score`, the one path from prompts to scored samples (training rollouts, the evaluation, the
calibration cache), and `RolloutBuffer`, an iteration's experience dealt out in minibatches to the solver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from infalign.models.sampling import Rollout, decode_responses, generate

__all__ = ["Minibatch", "RolloutBuffer", "Scored", "sample_and_score"]


class Scored(NamedTuple):
    """k samples for each of P prompts and their rewards, prompt-major."""

    rollout: Rollout
    texts: list[str]  # [P * k] decoded responses
    rewards: torch.Tensor  # [P, k] as the reward model returns them (float32, on the CPU)
    generate_seconds: float
    score_seconds: float  # decoding and scoring


def sample_and_score(model, tokenizer, reward_model, prompts: list[str], reward_prompts: list[str], k: int,
                     gen_kwargs: dict, *, where: str, record_logprobs: bool = False) -> Scored:
    """Sample `k` responses per prompt with `model` (pure samples) and score them with `reward_model`, which reads
    the prompts as `reward_prompts`; non-finite rewards are refused, naming `where` they came from."""
    start = time.perf_counter()
    rollout = generate(model, tokenizer, prompts, k, gen_kwargs, record_logprobs=record_logprobs)
    sampled = time.perf_counter()
    texts = decode_responses(tokenizer, rollout)
    rewards = reward_model.score([p for p in reward_prompts for _ in range(k)], texts).view(len(prompts), k)
    bad = ~torch.isfinite(rewards)
    if bad.any():
        raise ValueError(f"the reward model returned {int(bad.sum())} non-finite score(s) for {where}, first for the "
                         f"prompt {reward_prompts[int(bad.nonzero()[0, 0])][-200:]!r}; check the reward model (its "
                         "dtype, its inputs' length)")
    return Scored(rollout, texts, rewards, sampled - start, time.perf_counter() - sampled)


class Minibatch(NamedTuple):
    """A minibatch of a buffer's rows: the sequences and, where the buffer has them, their per-row tables."""

    rollout: Rollout
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor | None


@dataclass
class RolloutBuffer:
    """One iteration's experience (rows prompt-major, `group` consecutive rows per prompt): the sequences, what
    was measured of them (`stats`), and for the policy's own samples the tables a policy-gradient solver reads."""

    rollout: Rollout
    stats: dict[str, float]
    iteration: int = 0
    prompts: int = 0  # prompts of this process's share
    group: int = 1  # consecutive samples per prompt kept together in a minibatch (k for rollouts)
    old_logp: torch.Tensor | None = None  # [S, T] policy log-probs at sampling time
    ref_logp: torch.Tensor | None = None  # [S, T] reference log-probs (computed once per rollout, fp32)
    rewards: torch.Tensor | None = None  # [P, k] the transformed rewards Phi(C), float64
    kl: dict[str, torch.Tensor] | None = None  # per sequence: k1, k3 (sequence_kl)
    exact_kl: torch.Tensor | None = None  # [S, T] the full-vocabulary KL of every position (exact solvers)
    advantages: torch.Tensor | None = None  # [S] or [S, T]: set by the solver
    raw_rewards: torch.Tensor | None = None  # [P, k] the reward model's scores (solvers of the win rate itself: maxk)
    reference_rewards: torch.Tensor | None = None  # [P, M] the calibration cache's reference scores (calibrated runs)

    def __len__(self) -> int:
        return self.rollout.input_ids.shape[0]

    def minibatches(self, size: int, generator: torch.Generator):
        """Shuffled minibatches (`Minibatch`) covering the buffer once. With `size` a multiple of `group` each
        prompt's k samples stay in one minibatch: the prompt then runs once per minibatch in `response_logprobs`,
        not once per sample (SmolLM2's prompts are 5x its responses: docs/benchmarks.md), and each minibatch's
        leave-one-out advantages sum to zero, as over the whole rollout."""
        n, group = len(self), self.group
        if group > 1 and size % group == 0 and n % group == 0:
            groups = torch.randperm(n // group, generator=generator)
            order = (groups[:, None] * group + torch.arange(group)).flatten()
        else:
            order = torch.randperm(n, generator=generator)
        r = self.rollout
        for idx in order.split(size):
            sub = Rollout(r.input_ids[idx], r.attention_mask[idx], r.response_mask[idx], r.prompt_len)
            yield Minibatch(sub, *(None if x is None else x[idx] for x in (self.old_logp, self.ref_logp,
                                                                            self.advantages)))
