"""The CTRL LightningModule: one `training_step` is one iteration, from prompts to optimizer steps.

An RL iteration (`training_step`, top to bottom): sample k responses per prompt with the policy and score them
(`rollout`: `sample_and_score`), calibrate the rewards against the cached reference rewards and transform them,
compute the KL to the frozen reference and the RLOO advantages; then `update`: `ppo_epochs` passes (one for
RLOO) of shuffled minibatch updates. Manual optimisation, so `global_step` counts optimizer steps and gradient
clipping is done here (`_step`, which also measures the gradient's norm: `train/grad/norm`). The optimizer is the
configured `optimizer` partial (conf/train.yaml), called with the policy's trainable parameters; the learning-rate
schedule the `scheduler` partial, stepped after every step (its value is logged as `train/lr` by Lightning's
`LearningRateMonitor`, which `infalign.trainer.run` adds).

Every statistic is logged once, under `train/...`; the iteration's KL and calibrated reward also go to the
progress bar as `kl` and `reward` (`logger=False`: in `trainer.callback_metrics`, not logged a second time).
The row's step is the iteration (Lightning's batches so far: one batch per iteration), the axis the evaluations
log at too (`infalign.trainer.evaluation`); `optimizer_step` beside it: the optimizer steps before this
iteration's, those of the policy whose samples the row measures (as an evaluation's at that iteration).

The first `distill.iterations` iterations are distillation instead (`distill_step`): weighted maximum
likelihood on stored reference samples of the training prompts, each weighted by exp(Phi(C) / beta)
normalised per prompt (C against the prompt's other samples): the optimal tilt fitted directly, with no
sampling and no policy-gradient noise. The RL iterations that follow (if any) start from its policy.

The reference is a submodule (Lightning moves it and casts it with the policy) but frozen, in eval mode, and
left out of checkpoints; the reward model is a plain attribute (it may hold several modules). Both are put on
the device in one place, `place_frozen_models`, which the datamodule calls before it samples with them.

With LoRA (`model.lora.r > 0`, `infalign.models.lora`) the policy shares the reference's weights (the same
tensors) and trains adapters only: the optimizer gets the adapters, checkpoints hold the adapters (and their
optimizer state), and `peft_model` saves them. `model.gradient_checkpointing` and LoRA's dropout act in the
update's passes only (`update_passes`, around every forward and backward of `update` and `distill_step`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import lightning as L
import torch

from infalign.core.calibration import leave_one_out_calibrated
from infalign.core.losses import (
    KL_PENALTY_MODES,
    AdaptiveKLController,
    GradientNoiseScale,
    distillation_weights,
    exact_kl_advantages,
    ppo_clip_loss,
    rloo_advantages,
    rloo_loss,
    sequence_kl,
    token_kl,
)
from infalign.models.logprobs import response_logprobs
from infalign.models.lora import (
    adapter_parameter_names,
    add_lora,
    check_lora_settings,
    enable_gradient_checkpointing,
    merged_copy,
    update_passes,
)
from infalign.models.sampling import Rollout, rollout_from_tokens
from infalign.runtime.seeds import derive_seed
from infalign.trainer.rollout import RolloutBuffer, sample_and_score

__all__ = ["DistillConfig", "InfAlignModule", "LR_KEY", "RLConfig", "gradient_norm"]

FROZEN_PREFIX = "reference."
LR_KEY = "train/lr"  # the learning rate's key (LearningRateMonitor, named by the scheduler config)
OPTIMIZER_STEP = "optimizer_step"  # the optimizer steps, logged beside the iteration axis (as evaluation.py does)


def gradient_norm(module: torch.nn.Module) -> float:
    """The total L2 norm of `module`'s gradients (parameters without one skipped), summed in float64."""
    norms = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0  # one host sync per step, not one per parameter


@dataclass(frozen=True)
class RLConfig:
    """The `rl` block of conf/train.yaml (defaults as there); the optimizer has its own block, `optimizer`."""

    algo: str = "rloo"  # rloo | ppo (PPO-clip, several passes over one rollout)
    k: int = 4  # samples per prompt
    iterations: int = 30
    prompts_per_iteration: int = 16
    minibatch_size: int = 32  # sequences per optimizer step (over all processes)
    ppo_epochs: int = 2  # passes over a rollout (ppo only)
    clip: float = 0.2
    grad_clip: float | None = 1.0
    kl_penalty: str = "reward"  # reward: R = Phi(C) - beta * KL_k1 per sequence | exact: full-vocabulary KL per token
    target_kl: float | None = None  # adapt beta towards this KL (nats per sequence)
    null_control: bool = False  # shuffle Phi within each prompt's k samples: every nat spent is drift
    grad_noise_scale: bool = True  # estimate the gradient noise scale from the minibatch gradients

    def __post_init__(self):
        if self.algo not in ("rloo", "ppo"):
            raise ValueError(f"rl.algo must be 'rloo' or 'ppo', got {self.algo!r}")
        if self.kl_penalty not in KL_PENALTY_MODES:
            raise ValueError(f"rl.kl_penalty must be one of {KL_PENALTY_MODES}, got {self.kl_penalty!r}")


@dataclass(frozen=True)
class DistillConfig:
    """The `distill` block of conf/train.yaml: the first `iterations` of `rl.iterations` distil the tilt."""

    iterations: int = 0  # 0 = off; rl.iterations = all iterations, distillation first
    m: int = 64  # reference samples per training prompt in the pool (their own cache entry)
    samples_per_prompt: int = 4  # pool samples resampled (by weight, with replacement) per prompt and iteration
    prompts_per_batch: int = 8  # prompts per batch while building the pool
    minibatch_size: int = 32  # sequences per optimizer step (over all processes); RL's is rl.minibatch_size


class InfAlignModule(L.LightningModule):
    def __init__(self, reference, tokenizer, reward_model, calibrator, transform, *, beta: float,
                 rl: RLConfig | Mapping, optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
                 gen_kwargs: dict, seed: int = 0, scheduler: Callable | None = None,
                 distill: DistillConfig | Mapping | None = None, lora: Mapping | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.lora = check_lora_settings(lora)  # None: LoRA off
        if self.lora:  # the reference's very weights, plus adapters: no second copy of the model
            self.policy, peft_model = add_lora(reference, self.lora, seed=derive_seed(seed, "lora_init"))
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
        self.calibrator, self.transform = calibrator, transform
        self.rl = rl if isinstance(rl, RLConfig) else RLConfig(**rl)
        self.distill = distill if isinstance(distill, DistillConfig) else DistillConfig(**(distill or {}))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.gen_kwargs, self.seed = dict(gen_kwargs), int(seed)
        self.noise_scale = GradientNoiseScale() if self.rl.grad_noise_scale else None
        self.kl_controller = AdaptiveKLController(beta, self.rl.target_kl) if self.rl.target_kl else None
        self._beta = float(beta)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave the frozen reference out (on_save_checkpoint)

    @property
    def beta(self) -> float:
        return self.kl_controller.beta if self.kl_controller else self._beta

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (over all processes: every process steps together)."""
        rl_iterations = self.rl.iterations - self.distill.iterations
        per_rl = (self.rl.ppo_epochs if self.rl.algo == "ppo" else 1) * -(-self.rl.prompts_per_iteration * self.rl.k
                                                                          // self.rl.minibatch_size)
        per_distill = -(-self.rl.prompts_per_iteration * self.distill.samples_per_prompt // self.distill.minibatch_size)
        return rl_iterations * per_rl + self.distill.iterations * per_distill

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.optimizer_steps())
        # name: the key LearningRateMonitor logs the learning rate under
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LR_KEY}}

    def _step(self, optimizer) -> float:
        """Clip, step, and advance the learning-rate schedule (manual optimisation: Lightning does not); returns
        the gradient's total norm before clipping (what clipping compares with `rl.grad_clip`), in float64."""
        norm = gradient_norm(self.policy)
        if self.rl.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.rl.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return norm

    def place_frozen_models(self, device: torch.device) -> None:
        """Put the reference and the reward model on `device`, the one place they are moved: before the
        datamodule's setup samples the calibration cache with them (Lightning moves the module, the reference
        with it, only after setup; the reward model, a plain attribute, it never moves)."""
        self.reference.to(device)
        self.reward_model.to(device)

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if self.rl.minibatch_size % world:
            raise ValueError(f"rl.minibatch_size={self.rl.minibatch_size} must be divisible by the {world} processes: "
                             "each process takes an equal share of every optimizer step's minibatch")

    # ------------------------------------------------------------------ one RL iteration
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts of the policy (shared tensors counted once)."""
        params = list(self.policy.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def policy_to_save(self) -> torch.nn.Module:
        """What `policy/` holds: the whole policy, or with LoRA the peft model (its save_pretrained: the adapters)."""
        return self.peft_model if self.peft_model is not None else self.policy

    def merged_policy(self) -> torch.nn.Module:
        """With LoRA: a plain transformers model, the base with the adapters merged in (a new copy)."""
        if self.peft_model is None:
            raise ValueError("merged_policy: LoRA is off (model.lora.r=0), there is nothing to merge")
        return merged_copy(self.peft_model)

    def training_step(self, batch, batch_idx):
        # Dropout off for the policy as for the reference: the update must score the sampled distribution.
        self.policy.eval()
        self.reference.eval()
        iteration, optimizer_step = self.current_epoch, self.global_step  # before this iteration's steps
        # update_passes: gradient checkpointing and LoRA's dropout act in the updates' forward and backward passes only
        if iteration < self.distill.iterations:
            with update_passes(self.policy):
                stats = self.distill_step(batch, iteration, self.trainer.datamodule.distill_pool)
        else:
            torch.manual_seed(derive_seed(self.seed, "rollout", iteration, self.global_rank))
            buffer = self.rollout(batch, self.trainer.datamodule.reference_samples, iteration)
            with update_passes(self.policy):
                stats = {**buffer.stats, **self.update(buffer, iteration)}
        if self.trainer.world_size > 1:  # means over all processes: beta must adapt identically everywhere
            values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
            stats = dict(zip(stats, self.trainer.strategy.reduce(values, reduce_op="mean").tolist()))
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"non-finite training statistics at iteration {iteration}: {stats}")
        if self.kl_controller and "kl/k1" in stats:  # all sequences of all processes
            self.kl_controller.update(stats["kl/k1"], n_steps=len(batch) * self.rl.k * self.trainer.world_size)
        self.log_dict({f"train/{k}": v for k, v in stats.items()} | {OPTIMIZER_STEP: float(optimizer_step)},
                      on_step=True, on_epoch=False, prog_bar=False, batch_size=len(batch))
        if "kl/k1" in stats:  # RL iterations; a distillation iteration samples nothing
            # for the progress bar only: logged above as train/kl/k1 and train/reward/calibrated
            self.log("kl", stats["kl/k1"], prog_bar=True, logger=False, on_step=True, on_epoch=False,
                     batch_size=len(batch))
            self.log("reward", stats["reward/calibrated"], prog_bar=True, logger=False, on_step=True,
                     on_epoch=False, batch_size=len(batch))

    @torch.no_grad()
    def rollout(self, batch: list[tuple[str, str, str]], reference_samples, iteration: int = 0) -> RolloutBuffer:
        """The iteration's samples: k per prompt of the batch's `(prompt_id, policy text, reward text)` items,
        scored, calibrated against `reference_samples` (the calibration cache), transformed; their KL to the
        reference and their RLOO advantages."""
        ids, prompts, reward_prompts = (list(x) for x in zip(*batch))
        k, beta, device = self.rl.k, self.beta, self.device
        # 1. sample and score; the sampling-time log-probs come with the samples (fp32 runs; else rescored below)
        scored = sample_and_score(self.policy, self.tokenizer, self.reward_model, prompts, reward_prompts, k,
                                  self.gen_kwargs, where="a training rollout", record_logprobs=True)
        rollout, t_generate, t_score = scored.rollout, scored.generate_seconds, scored.score_seconds
        start = time.perf_counter()
        # 2. calibrate and transform
        raw = scored.rewards.to(device).double()
        ref_rewards = reference_samples.rewards_for(ids).to(device) if self.calibrator.needs_reference else None
        calibrated = self.calibrator(raw, ref_rewards)
        transformed = torch.as_tensor(self.transform(calibrated)).double()
        if self.rl.null_control:  # Phi shuffled within each prompt's samples: no signal left, only drift
            g = torch.Generator().manual_seed(derive_seed(self.seed, "null_control", iteration, self.global_rank))
            order = torch.rand(transformed.shape, generator=g).argsort(dim=1).to(transformed.device)
            transformed = transformed.gather(1, order)
        t_calibrate = time.perf_counter() - start
        # 3. log-probs. Under trainer.precision=bf16-mixed this runs inside Lightning's autocast. Sampling,
        # scoring (and the update) may use bf16, but the log-probs behind the KL are computed in fp32: bf16 moves
        # a sequence's k1 KL by ~0.08 nats, half the KL of an early policy, while it moves rewards by 0.5% of
        # their spread and flips 0.15% of the comparisons with the fp32-scored cache (docs/benchmarks.md, 2).
        start = time.perf_counter()
        exact_kl = None
        with torch.autocast(device.type, enabled=False):
            if self.rl.kl_penalty == "exact":  # both full log-softmaxes: the exact KL of every visited position
                old_logp, entropy, logp_all = response_logprobs(self.policy, rollout, with_entropy=True,
                                                                full_vocabulary=True)
                ref_logp, ref_all = response_logprobs(self.reference, rollout, full_vocabulary=True)
                width = logp_all.shape[1]
                exact_kl = torch.zeros_like(old_logp)
                exact_kl[:, :width] = token_kl(logp_all, ref_all, rollout.response_mask[:, :width])
                del logp_all, ref_all
            else:
                if rollout.logprobs is not None:
                    old_logp, entropy = rollout.logprobs, rollout.entropy
                else:
                    old_logp, entropy = response_logprobs(self.policy, rollout, with_entropy=True)
                ref_logp = response_logprobs(self.reference, rollout)
        t_logprobs = time.perf_counter() - start
        # 4. KL and advantages
        kl = sequence_kl(old_logp, ref_logp, rollout.response_mask)
        seq_reward = transformed.flatten()
        if exact_kl is not None:  # per token: Phi - beta * (exact KL still to come) - leave-one-out baseline
            advantages = exact_kl_advantages(transformed, exact_kl.double(), beta).float()
            seq_reward = seq_reward - beta * exact_kl.sum(-1).double()
        else:  # R = Phi(C) - beta * KL (k1, per sequence)
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
            **({"kl/exact": exact_kl.sum(-1).mean().item()} if exact_kl is not None else {}),
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

    def update(self, buffer: RolloutBuffer, iteration: int) -> dict[str, float]:
        """5. `ppo_epochs` passes (one for RLOO) of shuffled minibatch updates over the rollout; their statistics."""
        optimizer = self.optimizers()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "minibatch_order", iteration))
        losses, clip_fracs, grad_sq, norms = [], [], [], []
        start = time.perf_counter()
        # Distributed, each process holds 1/W of the rollout and DDP averages the gradients, so a per-process
        # minibatch of minibatch_size / W keeps the optimizer steps (count, sequences each) of one process.
        size = self.rl.minibatch_size // self.trainer.world_size
        # The noise scale needs >= 2 equal minibatches of the first pass (ppo's later passes reuse the samples)
        noise = self.noise_scale if len(buffer) % size == 0 and len(buffer) // size >= 2 else None
        grad_sum = None
        for epoch in range(self.rl.ppo_epochs if self.rl.algo == "ppo" else 1):
            for rollout, old_logp, _ref_logp, adv in buffer.minibatches(size, generator, group=self.rl.k):
                if self.rl.kl_penalty == "exact":
                    logp, logp_all = response_logprobs(self.policy, rollout, full_vocabulary=True)
                    with torch.no_grad():
                        _, ref_all = response_logprobs(self.reference, rollout, full_vocabulary=True)
                else:
                    logp = response_logprobs(self.policy, rollout)
                if self.rl.algo == "ppo":
                    loss, clip_frac = ppo_clip_loss(logp, old_logp, rollout.response_mask, adv, self.rl.clip)
                    clip_fracs.append(clip_frac.item())
                else:
                    loss = rloo_loss(logp, rollout.response_mask, adv)
                if self.rl.kl_penalty == "exact":  # the pathwise part of the KL's gradient (the rest is in adv)
                    width = logp_all.shape[1]
                    loss = loss + self.beta * token_kl(logp_all, ref_all, rollout.response_mask[:, :width]).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if epoch == 0 and noise is not None:  # the unclipped minibatch gradients of the first pass
                    grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
                    grad_sum = ([g.detach().double().clone() for g in grads] if grad_sum is None
                                else [acc.add_(g.detach().double()) for acc, g in zip(grad_sum, grads)])
                norms.append(self._step(optimizer))
                if epoch == 0:
                    grad_sq.append(norms[-1] ** 2)
                losses.append(loss.item())
        stats = {"time/update": time.perf_counter() - start, "policy/loss": sum(losses) / len(losses),
                 "grad/norm": sum(norms) / len(norms)}  # before clipping, mean over the iteration's steps
        if noise is not None and grad_sum is not None:
            steps = len(grad_sq)
            big_sq = sum(float(g.pow(2).sum()) for g in grad_sum) / steps**2  # |mean of the minibatch gradients|^2
            # no grad/noise_scale while it is undefined (|G|^2 estimate <= 0); the same keys on every process,
            # whose gradients DDP has averaged, as the reduction of the statistics needs
            stats.update(noise.update(sum(grad_sq) / steps, big_sq, self.rl.minibatch_size,
                                      self.rl.minibatch_size * steps))
        if clip_fracs:
            stats["policy/clip_fraction"] = sum(clip_fracs) / len(clip_fracs)
        return stats

    # ------------------------------------------------------------------ distillation
    def distill_step(self, batch: list[tuple[str, str, str]], iteration: int, pool) -> dict[str, float]:
        """One distillation iteration: for each prompt of the batch, weights w_i ∝ exp(Phi(C_i) / beta) over
        its pool of reference samples (C_i: sample i against the prompt's other samples), `samples_per_prompt`
        samples resampled by w, and maximum-likelihood steps on them. In expectation the gradient is that of
        the w-weighted log-likelihood, whose maximiser over all policies is the tilted reference the pool
        represents (soft best-of-M). The effective sample size 1 / sum w^2 says how many pool samples carry
        the target: far below M, the pool is too small for this beta."""
        start = time.perf_counter()
        ids, prompts = [b[0] for b in batch], [b[1] for b in batch]
        raw = pool.rewards_for(ids).double()
        calibrated = leave_one_out_calibrated(raw) if self.calibrator.needs_reference else raw
        weights, ess = distillation_weights(torch.as_tensor(self.transform(calibrated)), self.beta)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "distill", iteration, self.global_rank))
        picks = torch.multinomial(weights, self.distill.samples_per_prompt, replacement=True, generator=g)
        tokens, lengths = pool.tokens_for(ids)  # the sampled paths themselves (see ReferenceSamples)
        rows = torch.arange(len(ids)).unsqueeze(1)
        rollout = rollout_from_tokens(self.tokenizer, prompts, tokens[rows, picks], lengths[rows, picks])
        rollout = Rollout(*(x.to(self.device) for x in (rollout.input_ids, rollout.attention_mask,
                                                        rollout.response_mask)), rollout.prompt_len)
        optimizer = self.optimizers()
        order = torch.randperm(rollout.input_ids.shape[0],
                               generator=torch.Generator().manual_seed(derive_seed(self.seed, "minibatch_order",
                                                                                   iteration)))
        size = self.distill.minibatch_size // self.trainer.world_size
        losses, norms = [], []
        for idx in order.split(size):
            sub = Rollout(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.response_mask[idx],
                          rollout.prompt_len)
            loss = -response_logprobs(self.policy, sub).sum(-1).mean()  # negative log-likelihood per sequence
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            norms.append(self._step(optimizer))
            losses.append(loss.item())
        return {"distill/nll": sum(losses) / len(losses), "distill/ess": ess.mean().item(),
                "distill/ess_fraction": (ess / raw.shape[1]).mean().item(),
                "distill/target_calibrated": (weights * calibrated).sum(1).mean().item(),
                "policy/response_length": rollout.lengths.float().mean().item(),
                "grad/norm": sum(norms) / len(norms), "time/update": time.perf_counter() - start}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIX)
                                    and (self._checkpointed is None or k in self._checkpointed)}
        if self.kl_controller:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()
        if self.noise_scale:
            checkpoint["grad_noise_scale"] = self.noise_scale.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.kl_controller and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
        if self.noise_scale and "grad_noise_scale" in checkpoint:
            self.noise_scale.load_state_dict(checkpoint["grad_noise_scale"])
        policy_keys = (self._checkpointed if self._checkpointed is not None
                       else {k for k in self.state_dict() if not k.startswith(FROZEN_PREFIX)})
        missing = policy_keys - set(checkpoint["state_dict"])
        if missing:
            what = "LoRA adapter weights" if self.lora else "policy weights"
            raise RuntimeError(f"checkpoint lacks {len(missing)} {what} (e.g. {sorted(missing)[0]}): "
                               "it is not a checkpoint of this model (and model.lora)")
