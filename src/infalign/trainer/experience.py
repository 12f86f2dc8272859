"""Experience: what an iteration learns from, built from prompts by `RolloutBuilder` (the DataModule's worker).

An RL iteration (`rollout`): k samples per prompt from the policy, scored, calibrated against the calibration
cache and transformed, with the log-probs of the policy and the frozen reference and the KL between them. A
distillation iteration (`pool`): for each prompt, samples of its pool of reference samples drawn by
w ∝ exp(Phi(C) / beta). The builder is given the models it shares with the LightningModule and the two sample
sets (`CachedSamples`) explicitly.
"""

from __future__ import annotations

import time

import torch

from infalign.core.calibration import leave_one_out_calibrated
from infalign.core.losses import distillation_weights, sequence_kl, token_kl
from infalign.models.logprobs import response_logprobs
from infalign.models.sampling import Rollout, rollout_from_tokens
from infalign.runtime.seeds import derive_seed
from infalign.trainer.calibration_cache import CachedSamples
from infalign.trainer.prompts import Prompt
from infalign.trainer.rollout import RolloutBuffer, sample_and_score
from infalign.trainer.solvers.base import Experience

__all__ = ["RolloutBuilder"]


class RolloutBuilder:
    def __init__(self, *, policy, reference, tokenizer, reward_model, calibrator, transform, gen_kwargs: dict,
                 seed: int, calibration: CachedSamples, pool: CachedSamples | None = None,
                 null_control: bool = False):
        self.policy, self.reference, self.tokenizer, self.reward_model = policy, reference, tokenizer, reward_model
        self.calibrator, self.transform, self.gen_kwargs, self.seed = calibrator, transform, dict(gen_kwargs), int(seed)
        self.calibration, self.pool, self.null_control = calibration, pool, bool(null_control)
        self.device, self.rank = torch.device("cpu"), 0

    def setup(self, device: torch.device, rank: int = 0) -> None:
        """Put the reference and the reward model on `device` (the one place they are moved: Lightning moves the
        module, the reference with it, only after the DataModule's setup; the reward model it never moves), then
        load or build the calibration cache and the pool (where, under DDP, every process exists)."""
        self.device, self.rank = device, rank
        self.reference.to(device)
        self.reward_model.to(device)
        self.calibration.get()
        if self.pool is not None:
            self.pool.get()

    @torch.no_grad()
    def build(self, experience: Experience, prompts: list[Prompt], iteration: int) -> RolloutBuffer:
        # Dropout off for the policy as for the reference: the update must score the sampled distribution.
        self.policy.eval()
        self.reference.eval()
        if experience.kind == "pool":
            return self.pool_draw(prompts, iteration, experience.samples_per_prompt, experience.beta)
        return self.rollout(prompts, iteration, experience.k, experience.exact_kl)

    def rollout(self, prompts: list[Prompt], iteration: int, k: int, exact: bool = False) -> RolloutBuffer:
        """k samples per prompt, scored, calibrated against the calibration cache, transformed; their KL to the
        reference (with `exact`, also the full-vocabulary KL of every position)."""
        torch.manual_seed(derive_seed(self.seed, "rollout", iteration, self.rank))
        device = self.device
        # 1. sample and score; the sampling-time log-probs come with the samples (fp32 runs; else rescored below)
        scored = sample_and_score(self.policy, self.tokenizer, self.reward_model, [p.text for p in prompts],
                                  [p.reward_text for p in prompts], k, self.gen_kwargs, where="a training rollout",
                                  record_logprobs=True)
        rollout, t_generate, t_score = scored.rollout, scored.generate_seconds, scored.score_seconds
        start = time.perf_counter()
        # 2. calibrate and transform
        raw = scored.rewards.to(device).double()
        ref_rewards = (self.calibration.get().rewards_for([p.id for p in prompts]).to(device)
                       if self.calibrator.needs_reference else None)
        calibrated = self.calibrator(raw, ref_rewards)
        transformed = torch.as_tensor(self.transform(calibrated)).double()
        if self.null_control:  # Phi shuffled within each prompt's samples: no signal left, only drift
            g = torch.Generator().manual_seed(derive_seed(self.seed, "null_control", iteration, self.rank))
            order = torch.rand(transformed.shape, generator=g).argsort(dim=1).to(transformed.device)
            transformed = transformed.gather(1, order)
        t_calibrate = time.perf_counter() - start
        # 3. log-probs. Under trainer.precision=bf16-mixed this runs inside Lightning's autocast. Sampling and
        # scoring may use bf16, but the log-probs behind the KL are computed in fp32: bf16 moves a sequence's k1
        # KL by ~0.08 nats, half the KL of an early policy, while it moves rewards by 0.5% of their spread and
        # flips 0.15% of the comparisons with the fp32-scored cache (docs/benchmarks.md, 2).
        start = time.perf_counter()
        exact_kl = None
        with torch.autocast(device.type, enabled=False):
            if exact:  # both full log-softmaxes: the exact KL of every visited position
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
        kl = sequence_kl(old_logp, ref_logp, rollout.response_mask)
        lengths = rollout.lengths.float()
        stats = {
            "reward/raw": raw.mean().item(),
            "reward/calibrated": calibrated.double().mean().item(),
            "reward/transformed": transformed.mean().item(),
            "kl/k1": kl["k1"].mean().item(),
            "kl/k3": kl["k3"].mean().item(),
            **({"kl/exact": exact_kl.sum(-1).mean().item()} if exact_kl is not None else {}),
            "policy/entropy": (entropy.sum() / lengths.sum().clamp_min(1)).item(),
            "policy/response_length": lengths.mean().item(),
            "time/generate": t_generate,
            "time/score": t_score,
            "time/calibrate": t_calibrate,
            "time/logprobs": t_logprobs,
            "throughput/generated_tokens_per_s": lengths.sum().item() / max(t_generate, 1e-9),
        }
        return RolloutBuffer(rollout=rollout, stats=stats, iteration=iteration, prompts=len(prompts), group=k,
                             old_logp=old_logp, ref_logp=ref_logp, rewards=transformed, kl=kl, exact_kl=exact_kl,
                             raw_rewards=raw, reference_rewards=ref_rewards)

    def pool_draw(self, prompts: list[Prompt], iteration: int, samples_per_prompt: int, beta: float) -> RolloutBuffer:
        """`samples_per_prompt` of each prompt's pool samples, drawn with replacement by w ∝ exp(Phi(C) / beta).
        In expectation maximum likelihood on them follows the w-weighted log-likelihood, whose maximiser over all
        policies is the tilted reference the pool represents (soft best-of-M). The effective sample size
        1 / sum w^2 says how many pool samples carry the target: far below M, the pool is too small for this beta."""
        start = time.perf_counter()
        pool, ids = self.pool.get(), [p.id for p in prompts]
        raw = pool.rewards_for(ids).double()
        calibrated = leave_one_out_calibrated(raw) if self.calibrator.needs_reference else raw
        weights, ess = distillation_weights(torch.as_tensor(self.transform(calibrated)), beta)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "distill", iteration, self.rank))
        picks = torch.multinomial(weights, samples_per_prompt, replacement=True, generator=g)
        tokens, lengths = pool.tokens_for(ids)  # the sampled paths themselves (see ReferenceSamples)
        rows = torch.arange(len(ids)).unsqueeze(1)
        rollout = rollout_from_tokens(self.tokenizer, [p.text for p in prompts], tokens[rows, picks],
                                      lengths[rows, picks])
        rollout = Rollout(*(x.to(self.device) for x in (rollout.input_ids, rollout.attention_mask,
                                                        rollout.response_mask)), rollout.prompt_len)
        stats = {"distill/ess": ess.mean().item(), "distill/ess_fraction": (ess / raw.shape[1]).mean().item(),
                 "distill/target_calibrated": (weights * calibrated).sum(1).mean().item(),
                 "policy/response_length": rollout.lengths.float().mean().item(),
                 "time/draw": time.perf_counter() - start}
        return RolloutBuffer(rollout=rollout, stats=stats, iteration=iteration, prompts=len(prompts), group=1)
