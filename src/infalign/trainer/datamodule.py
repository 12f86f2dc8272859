"""The training prompts and the calibration cache, as a LightningDataModule: what the RL iterations read.

One training iteration = one Lightning epoch of one batch: a batch of training prompts. Making the
iteration an epoch means a checkpoint always falls between iterations, so resuming continues with the
next iteration's prompts (the sampler derives them from the seed and the epoch number) instead of
restarting an epoch. The module turns the prompt batch into a rollout and updates on it
(`InfAlignModule.training_step`); it reads the calibration cache (`reference_samples`) loaded here.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from infalign.runtime.seeds import derive_seed
from infalign.trainer.calibration_cache import ReferenceSamples

__all__ = ["IterationSampler", "RolloutDataModule"]


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
                "or raise data.train_prompts"
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
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "prompt_order", cycle))
            perm = torch.randperm(self.num_prompts, generator=generator)
            take = min(self.per_iteration - len(out), self.num_prompts - offset)
            out.extend(perm[offset : offset + take].tolist())
        return iter(out[self.rank :: self.world])


class RolloutDataModule(L.LightningDataModule):
    """Training prompts (one batch per iteration), evaluation prompts, and the calibration cache.

    `reference_samples` is the calibration cache or a zero-argument function that loads or builds it. The
    function is called in `setup`, where every process exists and the process group is up (Lightning
    re-launches the script per process on `trainer.fit`), so a distributed run splits the building across
    ranks and stores it once (`load_or_build_reference_samples`)."""

    def __init__(self, train_prompts: list[tuple[str, str, str]], eval_prompts: list[tuple[str, str, str]],
                 reference_samples: ReferenceSamples | Callable[[], ReferenceSamples], prompts_per_iteration: int,
                 seed: int, distill_pool: ReferenceSamples | Callable[[], ReferenceSamples] | None = None):
        super().__init__()
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self._build_reference_samples = None if isinstance(reference_samples, ReferenceSamples) else reference_samples
        self.reference_samples = reference_samples if self._build_reference_samples is None else None
        self.prompts_per_iteration, self.seed = int(prompts_per_iteration), int(seed)
        # distillation's pool of reference samples of the training prompts: built in setup like the cache
        self._build_distill_pool = distill_pool if callable(distill_pool) else None
        self.distill_pool = None if callable(distill_pool) else distill_pool
        self.sampler = IterationSampler(len(train_prompts), self.prompts_per_iteration, self.seed)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.sampler.shard(trainer.global_rank, trainer.world_size)
        # Lightning moves the module to its device only after setup: the calibration cache is sampled on it already
        trainer.lightning_module.place_frozen_models(trainer.strategy.root_device)
        if self.reference_samples is None:
            self.reference_samples = self._build_reference_samples()
        if self.distill_pool is None and self._build_distill_pool is not None:
            self.distill_pool = self._build_distill_pool()

    def train_dataloader(self) -> DataLoader:
        # Items are (prompt_id, policy text, reward text); the batch is a list of them (nothing to collate).
        return DataLoader(self.train_prompts, batch_size=len(self.sampler), sampler=self.sampler,
                          collate_fn=list, num_workers=0)
