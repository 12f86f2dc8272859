"""Prompts, the calibration cache and rollout buffers, as a LightningDataModule.

One training iteration = one Lightning epoch of one batch: a batch of training prompts. Making the
iteration an epoch means a checkpoint always falls between iterations, so resuming continues with the
next iteration's prompts (the sampler derives them from the seed and the epoch number) instead of
restarting an epoch. The module turns the prompt batch into a `RolloutBuffer` with `build_rollout`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from infalign.trainer.calibration_cache import ReferenceSamples, check_finite_rewards
from infalign.core.losses import rloo_advantages, sequence_kl
from infalign.models.sampling import Rollout, decode_responses, generate, response_logprobs

__all__ = ["IterationSampler", "RolloutBuffer", "RolloutDataModule", "build_rollout"]


class IterationSampler(Sampler[int]):
    """Yields this process's share of the `per_iteration` prompt indices of the current epoch (= iteration),
    walking through seeded permutations of all prompts, so the data order depends only on (seed, iteration).

    Distributed, rank r of W takes every W-th index of the iteration's list: the shares are disjoint and
    cover the iteration once, with no padding repeats (Lightning's DistributedSampler would pad and reshuffle,
    so the trainer runs with `use_distributed_sampler=False`)."""

    def __init__(self, num_prompts: int, per_iteration: int, seed: int):
        if per_iteration > num_prompts:
            raise ValueError(
                f"rl.prompts_per_iteration={per_iteration} exceeds the {num_prompts} training prompts; lower it "
                "or raise calibration.train_prompts"
            )
        self.num_prompts, self.per_iteration, self.seed, self.epoch = num_prompts, per_iteration, seed, 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        if self.per_iteration % world:
            raise ValueError(f"rl.prompts_per_iteration={self.per_iteration} must be divisible by the {world} "
                             "processes (every process updates on the same number of prompts per iteration)")
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_iteration // self.world

    def __iter__(self):
        start = self.epoch * self.per_iteration
        out = []
        while len(out) < self.per_iteration:
            cycle, offset = divmod(start + len(out), self.num_prompts)
            perm = torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed * 7919 + cycle))
            take = min(self.per_iteration - len(out), self.num_prompts - offset)
            out.extend(perm[offset : offset + take].tolist())
        return iter(out[self.rank :: self.world])


@dataclass
class RolloutBuffer:
    """One iteration's samples with everything the update needs (rows prompt-major, k per prompt)."""

    rollout: Rollout
    old_logp: torch.Tensor  # [S, T] policy log-probs at sampling time
    advantages: torch.Tensor  # [S]
    stats: dict[str, float]
    ref_logp: torch.Tensor | None = None  # [S, T] reference log-probs (computed once per rollout, fp32)

    def __len__(self) -> int:
        return self.advantages.shape[0]

    def minibatches(self, size: int, generator: torch.Generator):
        """Shuffled minibatches covering the buffer once: (sub-rollout, old_logp, ref_logp, advantages)."""
        order = torch.randperm(len(self), generator=generator)
        r = self.rollout
        for idx in order.split(size):
            sub = Rollout(r.input_ids[idx], r.attention_mask[idx], r.response_mask[idx], r.prompt_len)
            yield sub, self.old_logp[idx], self.ref_logp[idx], self.advantages[idx]


@torch.no_grad()
def build_rollout(module, prompt_ids: list[str], prompts: list[str], reward_prompts: list[str],
                  reference_samples: ReferenceSamples) -> RolloutBuffer:
    """Generate k responses per prompt with the policy, score, calibrate, transform, and compute advantages."""
    k, beta = module.rl.k, module.beta
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    # Under trainer.precision=bf16-mixed this runs inside Lightning's autocast. Sampling, scoring (and the
    # update) may use bf16, but the log-probs behind the KL are computed in fp32: bf16 moves a sequence's k1 KL
    # by ~0.08 nats, half the KL of an early policy, while it moves rewards by 0.5% of their spread and flips
    # 0.15% of the comparisons with the fp32-scored cache (docs/benchmarks.md, section 2).
    def fp32():
        return torch.autocast(module.device.type, enabled=False)

    # The sampling-time log-probs come with the samples (fp32 runs; else rescored below): no policy pass.
    rollout = generate(module.policy, module.tokenizer, prompts, k, module.gen_kwargs, record_logprobs=True)
    t_generate = lap()
    texts = decode_responses(module.tokenizer, rollout)
    raw = module.reward_model.score([p for p in reward_prompts for _ in range(k)], texts).to(module.device)
    check_finite_rewards(raw, reward_prompts, "a training rollout")
    raw = raw.view(len(prompts), k).double()
    t_score = lap()
    ref_rewards = reference_samples.rewards_for(prompt_ids).to(module.device) if module.calibrator.needs_reference else None
    calibrated = module.calibrator(raw, ref_rewards)
    transformed = torch.as_tensor(module.transform(calibrated)).double()
    t_calibrate = lap()

    with fp32():
        if rollout.logprobs is not None:
            old_logp, entropy = rollout.logprobs, rollout.entropy
        else:
            old_logp, entropy = response_logprobs(module.policy, rollout, with_entropy=True)
        ref_logp = response_logprobs(module.reference, rollout)
    t_logprobs = lap()
    kl = sequence_kl(old_logp, ref_logp, rollout.response_mask)
    seq_reward = transformed.flatten()
    if module.rl.kl_penalty == "reward":  # R = Phi(C) - beta * KL (k1, per sequence)
        seq_reward = seq_reward - beta * kl["k1"].double()
    advantages = rloo_advantages(seq_reward.view(len(prompts), k)).flatten().float()

    lengths = rollout.lengths.float()
    stats = {
        "reward/raw": raw.mean().item(),
        "reward/calibrated": calibrated.double().mean().item(),
        "reward/transformed": transformed.mean().item(),
        "reward/total": seq_reward.mean().item(),
        "kl/k1": kl["k1"].mean().item(),
        "kl/k3": kl["k3"].mean().item(),
        "policy/entropy": (entropy.sum() / lengths.sum().clamp_min(1)).item(),
        "policy/response_length": lengths.mean().item(),
        "beta": beta,
        "time/generate": t_generate,
        "time/score": t_score,
        "time/calibrate": t_calibrate,
        "time/logprobs": t_logprobs,
        "throughput/generated_tokens_per_s": lengths.sum().item() / max(t_generate, 1e-9),
    }
    return RolloutBuffer(rollout=rollout, old_logp=old_logp, advantages=advantages, stats=stats, ref_logp=ref_logp)


class RolloutDataModule(L.LightningDataModule):
    """Training prompts (one batch per iteration), evaluation prompts, and the calibration cache.

    `reference_samples` is the calibration cache or a zero-argument function that loads or builds it. The
    function is called in `setup`, where every process exists and the process group is up (Lightning
    re-launches the script per process on `trainer.fit`), so a distributed run splits the building across
    ranks and stores it once (`load_or_build_reference_samples`)."""

    def __init__(self, train_prompts: list[tuple[str, str, str]], eval_prompts: list[tuple[str, str, str]],
                 reference_samples: ReferenceSamples | Callable[[], ReferenceSamples], prompts_per_iteration: int,
                 seed: int):
        super().__init__()
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self._build_reference_samples = None if isinstance(reference_samples, ReferenceSamples) else reference_samples
        self.reference_samples = reference_samples if self._build_reference_samples is None else None
        self.prompts_per_iteration, self.seed = int(prompts_per_iteration), int(seed)
        self.sampler = IterationSampler(len(train_prompts), self.prompts_per_iteration, self.seed)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.sampler.shard(trainer.global_rank, trainer.world_size)
        if self.reference_samples is None:
            # Lightning moves the module to its device only after setup: generate on that device already.
            module, device = trainer.lightning_module, trainer.strategy.root_device
            module.reference.to(device)
            module.reward_model.to(device)
            self.reference_samples = self._build_reference_samples()

    def train_dataloader(self) -> DataLoader:
        # Items are (prompt_id, policy text, reward text); the batch is a list of them (nothing to collate).
        return DataLoader(self.train_prompts, batch_size=len(self.sampler), sampler=self.sampler,
                          collate_fn=list, num_workers=0)

    def build_rollout(self, module, batch: list[tuple[str, str, str]]) -> RolloutBuffer:
        ids, prompts, reward_prompts = (list(x) for x in zip(*batch))
        return build_rollout(module, ids, prompts, reward_prompts, self.reference_samples)
