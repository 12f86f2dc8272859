"""The experience of every iteration, as a LightningDataModule: its training "batch" is the iteration's
`RolloutBuffer`, built by the `RolloutBuilder` it is given from the iteration's prompts, as the solver asks
(`Solver.experience`).

One training iteration = one Lightning epoch of one batch, so a checkpoint always falls between iterations and a
resumed run continues with the next iteration's prompts (derived from the seed and the epoch number).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from infalign.runtime.seeds import derive_seed
from infalign.trainer.experience import RolloutBuilder
from infalign.trainer.prompts import Prompt
from infalign.trainer.solvers.base import Solver

__all__ = ["Experiences", "IterationSampler", "RolloutDataModule"]


class IterationSampler(Sampler[int]):
    """Yields this process's share of the `per_iteration` prompt indices of the current epoch (= iteration),
    walking through seeded permutations of all prompts: the order depends only on (seed, iteration). Rank r of W
    takes every W-th index, with no padding repeats (Lightning's DistributedSampler would pad and reshuffle)."""

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


class Experiences:
    """The training loader: for each batch of prompts (one per iteration), the buffer the solver asks for.
    `sampler` is the prompt loader's, so Lightning sets its epoch (the iteration) as for a DataLoader."""

    def __init__(self, prompts: DataLoader, builder: RolloutBuilder, solver: Solver, precision_context):
        self.prompts, self.builder, self.solver, self.precision_context = prompts, builder, solver, precision_context
        self.sampler = prompts.sampler

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        for batch in self.prompts:
            iteration = self.sampler.epoch
            with self.precision_context():  # e.g. trainer.precision=bf16-mixed: the autocast the step runs in
                yield self.builder.build(self.solver.experience(iteration), batch, iteration)


class RolloutDataModule(L.LightningDataModule):
    """Training prompts (one batch per iteration) turned into experience by `builder` for `solver`."""

    def __init__(self, train_prompts: list[Prompt], builder: RolloutBuilder, solver: Solver,
                 prompts_per_iteration: int, seed: int):
        super().__init__()
        self.train_prompts, self.builder, self.solver = train_prompts, builder, solver
        self.sampler = IterationSampler(len(train_prompts), int(prompts_per_iteration), int(seed))

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.sampler.shard(trainer.global_rank, trainer.world_size)
        # the frozen models on the device, the calibration cache (and pool) loaded or built with them
        self.builder.setup(trainer.strategy.root_device, trainer.global_rank)

    def train_dataloader(self) -> Experiences:
        # a batch is a list of Prompt records (nothing to collate)
        prompts = DataLoader(self.train_prompts, batch_size=len(self.sampler), sampler=self.sampler,
                             collate_fn=list, num_workers=0)
        return Experiences(prompts, self.builder, self.solver, self.trainer.precision_plugin.train_step_context)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # built on the device already
