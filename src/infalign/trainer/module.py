"""The CTRL LightningModule: trainable policy, frozen reference, frozen reward model, calibrator, transform.

Manual optimisation: one `training_step` is one RL iteration (rollout, then `ppo_epochs` passes of
minibatch updates), so `global_step` counts optimizer steps and gradient clipping is done here.
The reference is a submodule (Lightning moves it and casts it with the policy) but frozen, in eval mode,
and left out of checkpoints; the reward model is a plain attribute (it may hold several modules).
"""

from __future__ import annotations

import copy
import math
import time
from types import SimpleNamespace

import lightning as L
import torch

from infalign.core.losses import KL_PENALTY_MODES, AdaptiveKLController, ppo_clip_loss, rloo_loss
from infalign.models.sampling import response_logprobs

__all__ = ["InfAlignModule"]

FROZEN_PREFIX = "reference."


class InfAlignModule(L.LightningModule):
    def __init__(self, reference, tokenizer, reward_model, calibrator, transform, *, beta: float, rl: dict,
                 gen_kwargs: dict, seed: int = 0):
        super().__init__()
        self.policy = copy.deepcopy(reference).requires_grad_(True)
        self.reference = reference
        self.reference.eval().requires_grad_(False)
        self.tokenizer, self.reward_model = tokenizer, reward_model
        self.calibrator, self.transform = calibrator, transform
        self.rl = SimpleNamespace(**rl)
        if self.rl.algo not in ("rloo", "ppo"):
            raise ValueError(f"rl.algo must be 'rloo' or 'ppo', got {self.rl.algo!r}")
        if self.rl.kl_penalty not in KL_PENALTY_MODES:
            raise ValueError(f"rl.kl_penalty must be one of {KL_PENALTY_MODES}, got {self.rl.kl_penalty!r}")
        self.gen_kwargs, self.seed = dict(gen_kwargs), int(seed)
        self.kl_controller = AdaptiveKLController(beta, self.rl.target_kl) if self.rl.target_kl else None
        self._beta = float(beta)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave the frozen reference out (on_save_checkpoint)

    @property
    def beta(self) -> float:
        return self.kl_controller.beta if self.kl_controller else self._beta

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.rl.lr, weight_decay=self.rl.weight_decay, betas=(0.9, 0.95))

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if self.rl.minibatch_size % world:
            raise ValueError(f"rl.minibatch_size={self.rl.minibatch_size} must be divisible by the {world} processes: "
                             "each process takes an equal share of every optimizer step's minibatch")

    def on_fit_start(self) -> None:
        self.reward_model.to(self.device)

    def training_step(self, batch, batch_idx):
        # Dropout off for the policy as for the reference: the update must score the sampled distribution.
        self.policy.eval()
        self.reference.eval()
        iteration = self.current_epoch
        torch.manual_seed(self.seed * 1_000_003 + 7 * iteration + 1 + 97 * self.global_rank)
        buffer = self.trainer.datamodule.build_rollout(self, batch)
        optimizer = self.optimizers()
        generator = torch.Generator().manual_seed(self.seed * 31 + iteration)
        losses, clip_fracs = [], []
        t_update = time.perf_counter()
        for _ in range(self.rl.ppo_epochs if self.rl.algo == "ppo" else 1):
            # Distributed, each process holds 1/W of the rollout and DDP averages the gradients, so a per-process
            # minibatch of minibatch_size / W keeps the optimizer steps (count, sequences each) of one process.
            for rollout, old_logp, ref_logp, adv in buffer.minibatches(self.rl.minibatch_size // self.trainer.world_size, generator):
                logp = response_logprobs(self.policy, rollout)
                if self.rl.algo == "ppo":
                    loss, clip_frac = ppo_clip_loss(logp, old_logp, rollout.response_mask, adv, self.rl.clip)
                    clip_fracs.append(clip_frac.item())
                else:
                    loss = rloo_loss(logp, rollout.response_mask, adv)
                if self.rl.kl_penalty == "loss":  # k3 per token in the loss instead of k1 in the reward
                    # (the reference is frozen: its log-probs from the rollout serve every minibatch and pass)
                    log_r = (ref_logp - logp) * rollout.response_mask
                    loss = loss + self.beta * (torch.expm1(log_r) - log_r).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if self.rl.grad_clip:
                    self.clip_gradients(optimizer, gradient_clip_val=self.rl.grad_clip, gradient_clip_algorithm="norm")
                optimizer.step()
                losses.append(loss.item())
        stats = dict(buffer.stats)
        stats["time/update"] = time.perf_counter() - t_update
        stats["policy/loss"] = sum(losses) / len(losses)
        if clip_fracs:
            stats["policy/clip_fraction"] = sum(clip_fracs) / len(clip_fracs)
        if self.trainer.world_size > 1:  # means over all processes: beta must adapt identically everywhere
            values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
            stats = dict(zip(stats, self.trainer.strategy.reduce(values, reduce_op="mean").tolist()))
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"non-finite training statistics at iteration {iteration}: {stats}")
        if self.kl_controller:
            self.kl_controller.update(stats["kl/k1"], n_steps=len(buffer) * self.trainer.world_size)  # all sequences
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False, prog_bar=False,
                      batch_size=len(batch))
        self.log("kl", stats["kl/k1"], prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch))
        self.log("reward", stats["reward/calibrated"], prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=len(batch))
        self.last_train_stats = stats

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN_PREFIX)}
        if self.kl_controller:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.kl_controller and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
        policy_keys = {k for k in self.state_dict() if not k.startswith(FROZEN_PREFIX)}
        missing = policy_keys - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} policy weights (e.g. {sorted(missing)[0]}): "
                               "it is not a checkpoint of this model")
