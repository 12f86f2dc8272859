"""Win-rate evaluation as a Lightning callback: best-of-N and worst-of-N win rates against the reference.

Every `every` iterations and at the end of training, the policy samples `k` responses for each held-out
prompt; the torchmetrics `InferenceTimeWinRate` compares their rewards with the M cached reference
rewards of the same prompt (exact U-statistic, any K, M >= N). Results go to every logger (W&B, CSV),
to `eval_metrics.csv` (one row per evaluation); the final one is kept in `final` for `final_metrics.json`,
and in the checkpoints written after it: a run killed after its final evaluation takes it from there on resume
instead of evaluating (and writing its rows) twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from infalign.core.calibration import EmpiricalCalibrator
from infalign.core.losses import sequence_kl
from infalign.core.metrics import InferenceTimeWinRate
from infalign.models.sampling import response_logprobs
from infalign.runtime.atomic import atomic_write_csv, atomic_write_json, read_csv_rows
from infalign.runtime.seeds import derive_seed
from infalign.trainer.rollout import sample_and_score

log = logging.getLogger(__name__)

__all__ = ["WinRateCallback", "atomic_write_json"]


class WinRateCallback(L.Callback):
    def __init__(self, eval_prompts: list[tuple[str, str, str]], reference_samples, ns: list[int], k: int, every: int,
                 gen_kwargs: dict, out_dir: str | Path, seed: int = 0, batch_prompts: int = 8):
        self.prompt_ids = [p[0] for p in eval_prompts]
        self.prompts = [p[1] for p in eval_prompts]  # as the policy reads them
        self.reward_prompts = [p[2] for p in eval_prompts]  # as the reward model reads them
        if len(set(self.prompt_ids)) != len(self.prompt_ids):
            raise ValueError("evaluation prompts must be unique: each prompt is counted once")
        self.ns, self.k, self.every = sorted(set(ns)), int(k), int(every)
        self.reference_samples = None
        if reference_samples is not None:  # else the datamodule's, once it has loaded or built it (setup)
            self._set_reference_samples(reference_samples)
        self.gen_kwargs, self.out_dir, self.seed, self.batch_prompts = gen_kwargs, Path(out_dir), seed, batch_prompts
        self.metrics = {(mode, n): InferenceTimeWinRate(n=n, mode=mode) for mode in ("bon", "won") for n in self.ns}
        # torchmetrics means: synchronised across processes like the win rates
        # float64 states: the sum over processes then matches one process to ~1e-15, not float32 rounding
        self.means = {name: MeanMetric().set_dtype(torch.float64)
                      for name in ("kl", "kl_k3", "reward_raw", "reward_calibrated")}
        self.final: dict | None = None

    def _set_reference_samples(self, reference_samples) -> None:
        too_big = [n for n in self.ns if n > min(self.k, reference_samples.m)]
        if too_big:
            raise ValueError(f"eval N={too_big} needs eval.k and calibration.m >= N (got k={self.k}, "
                             f"M={reference_samples.m}); raise them or drop those N from eval.ns")
        self.reference_samples = reference_samples

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, module, stage: str) -> None:
        if self.reference_samples is None:  # Lightning calls the datamodule's setup before the callbacks'
            self._set_reference_samples(trainer.datamodule.reference_samples)

    def on_train_epoch_end(self, trainer, module) -> None:
        iteration = trainer.current_epoch + 1
        if self.every and iteration % self.every == 0 and iteration < trainer.max_epochs:
            self.run_eval(trainer, module, iteration)

    def on_train_end(self, trainer, module) -> None:
        # after the last epoch Lightning has already advanced current_epoch to the number completed
        iteration = trainer.current_epoch
        done = self.final
        if done is not None and done.get("iteration") == iteration and done.get("step") == trainer.global_step:
            # restored from a checkpoint written after this very evaluation: its rows are in the files already
            log.info("final evaluation at iteration %d: restored from the checkpoint", iteration)
            return
        self.final = self.run_eval(trainer, module, iteration)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"final": dict(self.final)} if self.final is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.final = state_dict.get("final")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, module) -> dict[str, float]:
        """Win rates, KL and mean rewards of the current policy on the evaluation prompts."""
        device = module.device
        module.policy.eval()  # dropout off, as in training_step (a resumed run may evaluate before any step)
        for metric in [*self.metrics.values(), *self.means.values()]:
            metric.reset()
            metric.to(device)  # the states must live where the process group syncs them (nccl: on the GPU)
        state = torch.random.get_rng_state()
        # The prompts are cut into fixed batches and process r of W evaluates batches r, r + W, ...: every
        # prompt exactly once overall, no padding repeats. Each batch is seeded by its index (not the rank,
        # nor the step), so a prompt gets the same samples whatever the number of processes, and every
        # evaluation of a run sees comparable samples.
        rank, world = module.global_rank, module.trainer.world_size if module._trainer else 1
        starts = range(0, len(self.prompts), self.batch_prompts)
        try:
            for b in range(rank, len(starts), world):
                rows = range(starts[b], min(starts[b] + self.batch_prompts, len(self.prompts)))
                torch.manual_seed(derive_seed(self.seed, "evaluation", b))
                ids = [self.prompt_ids[i] for i in rows]
                prompts = [self.prompts[i] for i in rows]
                reward_prompts = [self.reward_prompts[i] for i in rows]
                scored = sample_and_score(module.policy, module.tokenizer, module.reward_model, prompts, reward_prompts,
                                          self.k, self.gen_kwargs, where="an evaluation sample")
                rollout, raw = scored.rollout, scored.rewards.double().to(device)
                ref = self.reference_samples.rewards_for(ids).double().to(device)
                for metric in self.metrics.values():
                    metric.update(raw, ref)
                kl = sequence_kl(response_logprobs(module.policy, rollout),
                                 response_logprobs(module.reference, rollout), rollout.response_mask)
                self.means["kl"].update(kl["k1"].double())
                self.means["kl_k3"].update(kl["k3"].double())
                self.means["reward_raw"].update(raw.flatten())
                self.means["reward_calibrated"].update(EmpiricalCalibrator()(raw, ref).flatten())
        finally:
            torch.random.set_rng_state(state)
        out = {f"eval/{name}": metric.compute().item() for name, metric in self.means.items()}
        for (mode, n), metric in self.metrics.items():
            out[f"eval/{mode}_win_rate@{n}"] = metric.compute().item()
            out[f"eval/{mode}_win_rate@{n}_se"] = metric.standard_error().item()
        # prompts counted over all processes: equals the number of evaluation prompts unless one was repeated
        metric = next(iter(self.metrics.values()))
        with metric.sync_context():
            out["eval/prompts"] = int(metric.prompts.item())
        return out

    def run_eval(self, trainer, module, iteration: int) -> dict:
        results = self.evaluate(module)
        results = {"iteration": iteration, "step": trainer.global_step, **results}
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in results.items() if k.startswith("eval/")}, step=trainer.global_step)
        if trainer.is_global_zero:
            self._append_csv(results)
            log.info("eval @ iteration %d: %s", results["iteration"],
                     ", ".join(f"{k[5:]}={v:.4f}" for k, v in results.items()
                               if k.startswith("eval/") and "_se" not in k))
        return results

    def _append_csv(self, row: dict) -> None:
        # rewritten whole and renamed into place (infalign.runtime.atomic): a kill mid-write never truncates it
        path = self.out_dir / "eval_metrics.csv"
        rows = read_csv_rows(path)[1] + [dict(row)]
        atomic_write_csv(path, rows)
