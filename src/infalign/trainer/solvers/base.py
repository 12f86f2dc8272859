"""The solver interface: how one iteration's experience becomes optimizer steps.

A solver says which experience it learns from at each iteration (`experience`, built by the DataModule) and turns
that buffer into optimizer steps (`step`), returning the statistics to log. Its loss is its own (`loss`); the one
minibatch loop (`minibatch_steps`: shuffle, loss, backward, clip, step, schedule) is shared. docs/solvers.md shows
how to add one: a file with a subclass, and a YAML in conf/solver/ whose `solver._target_` names it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from infalign.models.lora import update_passes
from infalign.runtime.seeds import derive_seed

__all__ = ["Experience", "Solver", "gradient_norm"]


@dataclass(frozen=True)
class Experience:
    """What the DataModule builds for an iteration: `rollout` (k samples per prompt from the policy, with their
    KL to the reference; `exact_kl`: also the full-vocabulary KL of every position) or `pool` (for each prompt,
    `samples_per_prompt` of the distillation pool's reference samples, drawn by weight exp(Phi / beta))."""

    kind: str  # "rollout" | "pool"
    k: int = 0  # rollout: samples per prompt
    exact_kl: bool = False
    samples_per_prompt: int = 0  # pool
    beta: float = 0.0  # pool: the tilt's strength in its weights


def gradient_norm(module: torch.nn.Module) -> float:
    """The total L2 norm of `module`'s gradients (parameters without one skipped), summed in float64."""
    norms = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0  # one host sync per step, not one per parameter


class Solver(ABC):
    """Subclasses set `experience` and `loss` (and may override `step`, `optimizer_steps`, `end_iteration`)."""

    loss_key = "policy/loss"  # the mean loss's statistic
    # A solver learns from the transformed calibrated reward Phi(C) (`buffer.rewards`), and the run is judged on its
    # method's metric. One that optimises a win rate itself (maxk) uses no transform: it sets `uses_transform =
    # False` and names the win rate it optimises (`target_metric`: "bon" or "won"), which the run then reports.
    uses_transform: bool = True
    target_metric: str | None = None

    def __init__(self, *, beta: float, minibatch_size: int, grad_clip: float | None = None,
                 prompts_per_iteration: int = 1):
        self.beta, self.minibatch_size, self.grad_clip = float(beta), int(minibatch_size), grad_clip
        self.prompts_per_iteration = int(prompts_per_iteration)

    # ------------------------------------------------------------------ what a subclass says
    @abstractmethod
    def experience(self, iteration: int) -> Experience:
        """What the DataModule builds for `iteration` (`Experience`)."""

    def loss(self, module, minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The minibatch's loss (to minimise) and per-step statistics (averaged over the iteration's steps). A
        solver that only delegates its steps (`Stages`) has none."""
        raise TypeError(f"{type(self).__name__} defines no loss: a solver overrides loss(), or step() without it")

    def sequences_per_iteration(self, iteration: int) -> int:
        e = self.experience(iteration)
        return self.prompts_per_iteration * (e.k if e.kind == "rollout" else e.samples_per_prompt)

    def passes(self) -> int:
        """Passes over the buffer per iteration."""
        return 1

    def steps_at(self, iteration: int) -> int:
        """Optimizer steps of one iteration (over all processes: every process steps together)."""
        return self.passes() * -(-self.sequences_per_iteration(iteration) // self.minibatch_size)

    def optimizer_steps(self, iterations: int) -> int:
        """Optimizer steps of a run of `iterations` iterations (the learning-rate schedule's length)."""
        return sum(self.steps_at(i) for i in range(iterations))

    # ------------------------------------------------------------------ one iteration
    def step(self, module, buffer) -> dict[str, float]:
        """The iteration's optimizer steps on `buffer`; its statistics (the buffer's own first)."""
        with update_passes(module.policy):  # gradient checkpointing and LoRA's dropout: in the update's passes only
            return {**buffer.stats, **self.minibatch_steps(module, buffer)}

    def end_iteration(self, stats: Mapping[str, float], sequences: int, iteration: int) -> None:  # noqa: B027 (a hook)
        """After the statistics are averaged over all processes (an adaptive beta must adapt identically)."""

    def check(self, world: int) -> None:
        if self.minibatch_size % world:
            raise ValueError(f"the solver's minibatch_size={self.minibatch_size} must be divisible by the {world} "
                             "processes: each process takes an equal share of every optimizer step's minibatch")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:  # noqa: B027 (a hook: a solver without state ignores it)
        pass

    # ------------------------------------------------------------------ the one minibatch loop
    def minibatch_steps(self, module, buffer, noise=None) -> dict[str, float]:
        """`passes()` passes of shuffled minibatch steps over `buffer` (its `minibatches`, seeded by the iteration);
        the mean loss, the gradient's mean norm before clipping, the means of `loss`'s statistics, and with `noise`
        (a GradientNoiseScale) its estimate from the first pass's minibatch gradients."""
        optimizer = module.optimizers()
        generator = torch.Generator().manual_seed(derive_seed(module.seed, "minibatch_order", buffer.iteration))
        # Distributed, each process holds 1/W of the samples and DDP averages the gradients, so a per-process
        # minibatch of minibatch_size / W keeps the optimizer steps (count, sequences each) of one process.
        size = self.minibatch_size // module.trainer.world_size
        # the noise scale needs >= 2 equal minibatches of the first pass (ppo's later passes reuse the samples)
        noise = noise if len(buffer) % size == 0 and len(buffer) // size >= 2 else None
        losses, norms, extra, grad_sum = [], [], {}, None
        start = time.perf_counter()
        for p in range(self.passes()):
            for minibatch in buffer.minibatches(size, generator):
                loss, stats = self.loss(module, minibatch)
                for key, value in stats.items():
                    extra.setdefault(key, []).append(value)
                optimizer.zero_grad(set_to_none=True)
                module.manual_backward(loss)
                if p == 0 and noise is not None:  # the unclipped minibatch gradients of the first pass
                    grads = [g.grad for g in module.policy.parameters() if g.grad is not None]
                    grad_sum = ([g.detach().double().clone() for g in grads] if grad_sum is None
                                else [acc.add_(g.detach().double()) for acc, g in zip(grad_sum, grads)])
                norms.append(self.clip_and_step(module, optimizer))
                losses.append(loss.item())
        out = {"time/update": time.perf_counter() - start, self.loss_key: sum(losses) / len(losses),
               "grad/norm": sum(norms) / len(norms)}  # before clipping, mean over the iteration's steps
        if noise is not None and grad_sum is not None:
            grad_sq = [norm**2 for norm in norms[: len(norms) // self.passes()]]  # the first pass's steps
            steps = len(grad_sq)
            big_sq = sum(float(g.pow(2).sum()) for g in grad_sum) / steps**2  # |mean of the minibatch gradients|^2
            # no grad/noise_scale while it is undefined (|G|^2 estimate <= 0); the same keys on every process
            out.update(noise.update(sum(grad_sq) / steps, big_sq, self.minibatch_size, self.minibatch_size * steps))
        return out | {key: sum(v) / len(v) for key, v in extra.items()}

    def clip_and_step(self, module, optimizer) -> float:
        """Clip, step, and advance the learning-rate schedule (manual optimisation: Lightning does not); returns
        the gradient's total norm before clipping (what clipping compares with `grad_clip`), in float64."""
        norm = gradient_norm(module.policy)
        if self.grad_clip:
            module.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = module.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return norm
