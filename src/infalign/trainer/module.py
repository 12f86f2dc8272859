"""The CTRL LightningModule: it holds the policy, the frozen reference, the reward model, the calibrator, the
transform and the solver. One `training_step` is one iteration: the experience the DataModule built
(`infalign.trainer.experience`) handed to the solver, whose optimizer steps it is (manual optimisation:
`global_step` counts optimizer steps), and its statistics logged under `train/` at step = the iteration, the
axis the evaluations use too; `optimizer_step` beside it.

The reference is a frozen submodule (Lightning moves and casts it with the policy) left out of checkpoints; the
reward model is a plain attribute (it may hold several modules). With LoRA the policy shares the reference's
weights and checkpoints hold only the adapters.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping

import lightning as L
import torch

from infalign.models.lora import adapter_parameter_names, add_lora, check_lora_settings, enable_gradient_checkpointing
from infalign.runtime.seeds import derive_seed
from infalign.trainer.solvers.base import Solver, gradient_norm

log = logging.getLogger(__name__)

__all__ = ["InfAlignModule", "LR_KEY", "gradient_norm"]

FROZEN_PREFIX = "reference."
LR_KEY = "train/lr"  # the learning rate's key (LearningRateMonitor, named by the scheduler config)
OPTIMIZER_STEP = "optimizer_step"  # the optimizer steps, logged beside the iteration axis (as evaluation.py does)


class InfAlignModule(L.LightningModule):
    def __init__(self, reference, tokenizer, reward_model, calibrator, transform, *, solver: Solver,
                 optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer], iterations: int,
                 seed: int = 0, scheduler: Callable | None = None, lora: Mapping | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.lora = check_lora_settings(lora)  # None: LoRA off
        if self.lora:  # the reference's very weights, plus adapters: no second copy of the model
            self.policy, peft_model = add_lora(reference, self.lora, seed=derive_seed(seed, "lora_init"))
            params = list(self.policy.parameters())  # shared tensors counted once
            trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
            log.info("LoRA r=%d on %s: %s of %s policy parameters train (%.2f%%); the reference shares the base "
                     "weights", self.lora["r"], self.lora["target_modules"], f"{trainable:,}", f"{total:,}",
                     100 * trainable / total)
        else:
            self.policy, peft_model = copy.deepcopy(reference).requires_grad_(True), None
        # a plain attribute, not a submodule: it wraps self.policy, whose weights must appear once in state_dict
        object.__setattr__(self, "peft_model", peft_model)
        self.reference = reference
        self.reference.eval().requires_grad_(False)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        # what checkpoints hold of the policy: everything, or with LoRA the adapters (the base is the model cache's)
        self._checkpointed = ({f"policy.{n}" for n in adapter_parameter_names(self.policy)} if self.lora else None)
        self.tokenizer, self.reward_model = tokenizer, reward_model
        self.calibrator, self.transform, self.solver = calibrator, transform, solver
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.iterations, self.seed = int(iterations), int(seed)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave the frozen reference out (on_save_checkpoint)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.solver.optimizer_steps(self.iterations))
        # name: the key LearningRateMonitor logs the learning rate under
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LR_KEY}}

    def setup(self, stage: str) -> None:
        self.solver.check(self.trainer.world_size)

    def policy_to_save(self) -> torch.nn.Module:
        """What `policy/` holds: the whole policy, or with LoRA the peft model (its save_pretrained: the adapters)."""
        return self.peft_model if self.peft_model is not None else self.policy

    # ------------------------------------------------------------------ one iteration
    def training_step(self, buffer, batch_idx):
        self.policy.eval()  # dropout off, as the buffer was sampled: the update must score the sampled distribution
        self.reference.eval()
        iteration, optimizer_step, world = buffer.iteration, self.global_step, self.trainer.world_size
        stats = self.solver.step(self, buffer)
        if world > 1:  # means over all processes: beta must adapt identically everywhere
            values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
            stats = dict(zip(stats, self.trainer.strategy.reduce(values, reduce_op="mean").tolist()))
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"non-finite training statistics at iteration {iteration}: {stats}")
        self.solver.end_iteration(stats, sequences=len(buffer) * world, iteration=iteration)
        self.log_dict({f"train/{k}": v for k, v in stats.items()} | {OPTIMIZER_STEP: float(optimizer_step)},
                      on_step=True, on_epoch=False, prog_bar=False, batch_size=buffer.prompts)
        for bar, key in (("kl", "kl/k1"), ("reward", "reward/calibrated")):  # the progress bar's; logged above
            if key in stats:  # RL iterations (a distillation iteration samples nothing)
                self.log(bar, stats[key], prog_bar=True, logger=False, on_step=True, on_epoch=False,
                         batch_size=buffer.prompts)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIX)
                                    and (self._checkpointed is None or k in self._checkpointed)}
        checkpoint.update(self.solver.state_dict())  # its own keys: kl_controller, grad_noise_scale

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.solver.load_state_dict(checkpoint)
        policy_keys = (self._checkpointed if self._checkpointed is not None
                       else {k for k in self.state_dict() if not k.startswith(FROZEN_PREFIX)})
        missing = policy_keys - set(checkpoint["state_dict"])
        if missing:
            what = "LoRA adapter weights" if self.lora else "policy weights"
            raise RuntimeError(f"checkpoint lacks {len(missing)} {what} (e.g. {sorted(missing)[0]}): "
                               "it is not a checkpoint of this model (and model.lora)")
