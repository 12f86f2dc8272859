"""Win-rate evaluation as a Lightning callback: best-of-N and worst-of-N win rates against the reference.

Every `every` iterations and at the end of training the policy samples `k` responses per held-out prompt; the
torchmetrics `InferenceTimeWinRate` compares their rewards with the M cached reference rewards of the same prompt
(exact U-statistic). Besides the win rates: the k1/k3 KL, the KL in calibrated space (`CalibratedRankKL`) and the
mean response lengths of policy and reference (a policy that wins by answering shorter shows it). Results go to
every logger at step = the iteration (the training metrics' axis) and to `eval_metrics.csv`; the final one also to
`eval_per_prompt.csv` and, in `final`, to final_metrics.json and the checkpoints written after it (a run killed
after its final evaluation takes it from there on resume instead of evaluating twice).

`eval.held_in_prompts` = H > 0: H training prompts measured the same way by an evaluator of its own
(`eval_held_in/*`), after the held-out prompts and from its own seed stream, so the held-out numbers are bit for
bit those of a run without it. `eval.log_samples` = S > 0: samples of the first S prompts to read
(`infalign.trainer.eval_samples`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from infalign.core.calibration import EmpiricalCalibrator, leave_one_out_calibrated
from infalign.core.losses import sequence_kl
from infalign.core.metrics import InferenceTimeWinRate, inference_win_rate_per_prompt
from infalign.models.logprobs import response_logprobs
from infalign.runtime.atomic import atomic_write_csv, atomic_write_json, atomic_write_text, read_csv_rows
from infalign.runtime.console import format_metrics
from infalign.runtime.distributed import all_gather_object
from infalign.runtime.seeds import derive_seed
from infalign.trainer.calibration_cache import CachedSamples, ReferenceSamples
from infalign.trainer.eval_metrics import CalibratedRankKL, PerPromptTable, calibrated_rank_histogram, rank_kl
from infalign.trainer.eval_samples import SAMPLE_COLUMNS, SAMPLES_JSONL, SAMPLES_KEY, shown_prompt
from infalign.trainer.module import OPTIMIZER_STEP
from infalign.trainer.prompts import Prompt
from infalign.trainer.rollout import sample_and_score

log = logging.getLogger(__name__)

__all__ = ["CalibratedRankKL", "HELD_IN_PREFIX", "PER_PROMPT_CSV", "PER_PROMPT_HELD_IN_CSV", "PerPromptTable",
           "WinRateCallback", "atomic_write_json", "calibrated_rank_histogram", "rank_kl"]

PER_PROMPT_CSV = "eval_per_prompt.csv"
HELD_IN_PREFIX = "eval_held_in"  # the held-in evaluation's metrics (eval.held_in_prompts): eval_held_in/<metric>
PER_PROMPT_HELD_IN_CSV = "eval_per_prompt_held_in.csv"  # its per-prompt rows


class WinRateCallback(L.Callback):
    def __init__(self, eval_prompts: list[Prompt], reference_samples: ReferenceSamples | CachedSamples | None,
                 ns: list[int], k: int, every: int, gen_kwargs: dict, out_dir: str | Path, seed: int = 0,
                 batch_prompts: int = 8, log_samples: int = 0, n: int | None = None, mode: str = "bon",
                 held_in_prompts: list[Prompt] | None = None, prefix: str = "eval", stream: str = "evaluation",
                 per_prompt_csv: str = PER_PROMPT_CSV):
        """`held_in_prompts`: training prompts evaluated beside `eval_prompts` by an evaluator of its own, whose
        `prefix`, `stream` and `per_prompt_csv` these are (see the module's docstring)."""
        self.prompts = [Prompt(*p) for p in eval_prompts]
        self.prefix, self.stream, self.per_prompt_csv = prefix, stream, per_prompt_csv
        self.prompt_ids = [p.id for p in self.prompts]
        if len(set(self.prompt_ids)) != len(self.prompt_ids):
            raise ValueError("evaluation prompts must be unique: each prompt is counted once")
        self.ns, self.k, self.every = sorted(set(ns)), int(k), int(every)
        self.reference_samples = None
        self.kl_calibrated: CalibratedRankKL | None = None  # sized by M when the reference samples arrive
        # the calibration cache, or the one object that loads or builds it (in the DataModule's setup, before ours)
        self._cache = reference_samples if isinstance(reference_samples, CachedSamples) else None
        if reference_samples is not None and self._cache is None:
            self._set_reference_samples(reference_samples)
        self.gen_kwargs, self.out_dir, self.seed, self.batch_prompts = gen_kwargs, Path(out_dir), seed, batch_prompts
        self.log_samples = int(log_samples)  # the first this many prompts: responses and rewards to read
        # the samples' pick: the run's best-of-n (mode "won": worst-of-n); max(ns) where the run's n is not given
        self.n, self.mode = int(n) if n is not None else self.ns[-1], mode
        if mode not in ("bon", "won") or self.n not in self.ns:
            raise ValueError(f"samples pick {mode}@{self.n}: mode must be bon or won and n one of eval.ns {self.ns}")
        self.sample_rows: list[dict] = []  # the last evaluation's (every process's, in prompt order)
        self.metrics = {(mode, n): InferenceTimeWinRate(n=n, mode=mode) for mode in ("bon", "won") for n in self.ns}
        # torchmetrics means: synchronised across processes like the win rates
        # float64 states: the sum over processes then matches one process to ~1e-15, not float32 rounding
        self.means = {name: MeanMetric().set_dtype(torch.float64)
                      for name in ("kl", "kl_k3", "reward_raw", "reward_calibrated", "response_tokens")}
        # per prompt: what paired comparisons between methods need (eval_per_prompt.csv)
        self.per_prompt = PerPromptTable(len(self.prompt_ids), [*(f"{mode}_win_rate@{n}" for mode, n in self.metrics),
                                                                "kl", "reward_calibrated"])
        self.per_prompt_rows: list[dict] = []  # the last evaluation's, for eval_per_prompt.csv
        self.final: dict | None = None
        self.latest: dict | None = None  # the last evaluation's results (the progress bar shows its win rate)
        self.held_in = None if not held_in_prompts else WinRateCallback(
            held_in_prompts, reference_samples, ns, k, every, gen_kwargs, out_dir, seed=seed,
            batch_prompts=batch_prompts, log_samples=0, n=n, mode=mode, prefix=HELD_IN_PREFIX,
            stream="evaluation_held_in", per_prompt_csv=PER_PROMPT_HELD_IN_CSV)

    def _set_reference_samples(self, reference_samples) -> None:
        too_big = [n for n in self.ns if n > min(self.k, reference_samples.m)]
        if too_big:
            raise ValueError(f"eval N={too_big} needs eval.k and calibration.m >= N (got k={self.k}, "
                             f"M={reference_samples.m}); raise them or drop those N from eval.ns")
        self.reference_samples = reference_samples
        self.kl_calibrated = CalibratedRankKL(int(reference_samples.m))
        # the same cached samples at every evaluation: one mean length (NaN for an entry built without lengths)
        self.reference_tokens = (float(reference_samples.tokens_for(self.prompt_ids)[1].double().mean())
                                 if reference_samples.response_lengths is not None else float("nan"))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, module, stage: str) -> None:
        if self.reference_samples is None and self._cache is not None:
            self._set_reference_samples(self._cache.get())
        if self.held_in is not None:
            self.held_in.setup(trainer, module, stage)

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
        self.final = self.run_eval(trainer, module, iteration, final=True)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"final": dict(self.final)} if self.final is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.final = state_dict.get("final")
        self.latest = self.final

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, module) -> dict[str, float]:
        """Win rates, KL and mean rewards of the current policy on the evaluation prompts (`eval/*`), then on the
        held-in training prompts if any (`eval_held_in/*`)."""
        device = module.device
        module.policy.eval()  # dropout off, as in training_step (a resumed run may evaluate before any step)
        for metric in [*self.metrics.values(), *self.means.values(), self.kl_calibrated, self.per_prompt]:
            metric.reset()
            metric.to(device)  # the states must live where the process group syncs them (nccl: on the GPU)
        state = torch.random.get_rng_state()
        # The prompts are cut into fixed batches and process r of W evaluates batches r, r + W, ...: every
        # prompt exactly once overall, no padding repeats. Each batch is seeded by its index (not the rank,
        # nor the step), so a prompt gets the same samples whatever the number of processes, and every
        # evaluation of a run sees comparable samples.
        rank, world = module.global_rank, module.trainer.world_size if module._trainer else 1
        starts = range(0, len(self.prompts), self.batch_prompts)
        samples = []
        try:
            for b in range(rank, len(starts), world):
                rows = range(starts[b], min(starts[b] + self.batch_prompts, len(self.prompts)))
                torch.manual_seed(derive_seed(self.seed, self.stream, b))
                batch = [self.prompts[i] for i in rows]
                ids, reward_prompts = [p.id for p in batch], [p.reward_text for p in batch]
                scored = sample_and_score(module.policy, module.tokenizer, module.reward_model, [p.text for p in batch],
                                          reward_prompts, self.k, self.gen_kwargs, where="an evaluation sample")
                rollout, raw = scored.rollout, scored.rewards.double().to(device)
                ref = self.reference_samples.rewards_for(ids).double().to(device)
                for metric in self.metrics.values():
                    metric.update(raw, ref)
                self.kl_calibrated.update(raw, ref)
                kl = sequence_kl(response_logprobs(module.policy, rollout),
                                 response_logprobs(module.reference, rollout), rollout.response_mask)
                calibrated = EmpiricalCalibrator()(raw, ref)
                self.means["kl"].update(kl["k1"].double())
                self.means["kl_k3"].update(kl["k3"].double())
                self.means["reward_raw"].update(raw.flatten())
                self.means["reward_calibrated"].update(calibrated.flatten())
                self.means["response_tokens"].update(rollout.lengths.double())
                columns = [inference_win_rate_per_prompt(raw, ref, n, mode).to(device) for mode, n in self.metrics]
                columns += [kl["k1"].double().to(device).view(len(rows), -1).mean(1), calibrated.mean(1)]
                self.per_prompt.update(torch.tensor(list(rows)), torch.stack(columns, dim=1))
                samples += self._samples(rows, ids, reward_prompts, scored.texts, rollout.lengths, raw, calibrated, ref)
        finally:
            torch.random.set_rng_state(state)
        if self.log_samples:  # every process: the gather is collective
            self.sample_rows = sorted((r for shard in all_gather_object(samples) for r in shard),
                                      key=lambda r: r.pop("_index"))
        p = self.prefix
        out = {f"{p}/{name}": metric.compute().item() for name, metric in self.means.items()}
        out[f"{p}/reference_response_tokens"] = self.reference_tokens  # beside the policy's eval/response_tokens
        out[f"{p}/kl_calibrated"] = self.kl_calibrated.compute().item()
        table, evaluated = self.per_prompt.compute()  # every process: compute() synchronises
        self.per_prompt_rows = [{"prompt_id": pid, **dict(zip(self.per_prompt.columns, row))}
                                for pid, row, done in zip(self.prompt_ids, table.tolist(), evaluated.tolist()) if done]
        for (mode, n), metric in self.metrics.items():
            out[f"{p}/{mode}_win_rate@{n}"] = metric.compute().item()
            out[f"{p}/{mode}_win_rate@{n}_se"] = metric.standard_error().item()
        # prompts counted over all processes: equals the number of evaluation prompts unless one was repeated
        metric = next(iter(self.metrics.values()))
        with metric.sync_context():
            out[f"{p}/prompts"] = int(metric.prompts.item())
        if self.held_in is not None:  # after the held-out prompts, from its own stream: their numbers stay as they were
            out.update(self.held_in.evaluate(module))
        return out

    def _samples(self, rows, ids, prompts, texts, lengths, raw, calibrated, ref) -> list[dict]:
        """The sample rows of the batch's prompts among the first `log_samples`: the policy's first sample and the
        reference's first cached one, and the best (`mode` won: worst) of the first n of each by raw reward, what
        best-of-n serves; their lengths, raw and calibrated rewards (the reference's C leaves itself out)."""
        picked = [j for j, i in enumerate(rows) if i < self.log_samples]
        if not picked:
            return []
        k = len(texts) // len(ids)
        pids = [ids[j] for j in picked]
        ref_texts = self.reference_samples.responses_for(pids)
        ref_lengths = (self.reference_samples.tokens_for(pids)[1].tolist()
                       if self.reference_samples.response_lengths is not None else None)
        ref_calibrated = leave_one_out_calibrated(ref[picked]) if ref.shape[1] >= 2 else ref[picked] * float("nan")
        lengths, choose = lengths.view(len(ids), k).tolist(), torch.argmax if self.mode == "bon" else torch.argmin

        def side(name, text, tokens, reward, c):
            return {f"{name}_response": text, f"{name}_tokens": None if tokens is None else int(tokens),
                    f"{name}_reward_raw": float(reward), f"{name}_reward_calibrated": float(c)}

        def policy(name, j, i):  # batch row j's i-th sample
            return side(name, texts[j * k + i], lengths[j][i], raw[j, i], calibrated[j, i])

        def reference(name, j, a, i):  # and its reference's (a: its place among `picked`)
            tokens = None if ref_lengths is None else ref_lengths[a][i]
            return side(name, ref_texts[a][i], tokens, ref[j, i], ref_calibrated[a, i])

        return [{"_index": rows[j], "prompt_id": ids[j], "prompt": shown_prompt(prompts[j]),
                 "pick": f"{self.mode}@{self.n}", **policy("policy", j, 0), **reference("reference", j, a, 0),
                 **policy("policy_pick", j, int(choose(raw[j, : self.n]))),
                 **reference("reference_pick", j, a, int(choose(ref[j, : self.n])))} for a, j in enumerate(picked)]

    def _write_samples(self, trainer, iteration: int, step: int) -> None:
        """This evaluation's sample rows (`step`: the optimizer step) into eval_samples.jsonl (rows of this or a
        later iteration, written by a run that died before its checkpoint, replaced) and to every logger that
        shows tables, at step = the iteration like every logged metric."""
        rows = [{"iteration": iteration, "step": step, **r} for r in self.sample_rows]
        path = self.out_dir / SAMPLES_JSONL
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) < iteration]
        atomic_write_text(path, "".join(f"{line}\n" for line in [*kept, *(json.dumps(r) for r in rows)]))
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B (through GuardedLogger); the CSV logger has none
                logger.log_table(key=SAMPLES_KEY, columns=list(SAMPLE_COLUMNS),
                                 data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows], step=iteration)

    def run_eval(self, trainer, module, iteration: int, final: bool = False) -> dict:
        results = {"iteration": iteration, "step": trainer.global_step, **self.evaluate(module)}
        evaluated = [self] if self.held_in is None else [self, self.held_in]
        logged = {**{k: v for k, v in results.items() if k.startswith(tuple(f"{e.prefix}/" for e in evaluated))},
                  OPTIMIZER_STEP: trainer.global_step}
        for logger in trainer.loggers:  # step: the iteration, the training metrics' axis (not the optimizer step)
            logger.log_metrics(logged, step=iteration)
        if trainer.is_global_zero:
            # rewritten whole and renamed into place (infalign.runtime.atomic): a kill mid-write never truncates it
            csv = self.out_dir / "eval_metrics.csv"
            atomic_write_csv(csv, [*read_csv_rows(csv)[1], results])
            if self.log_samples:
                self._write_samples(trainer, iteration, trainer.global_step)
            for e in evaluated:
                if final:  # rank 0, after evaluate() gathered every process's prompts
                    atomic_write_csv(self.out_dir / e.per_prompt_csv, e.per_prompt_rows,
                                     ["prompt_id", *e.per_prompt.columns])
                log.info("%s @ iteration %d: %s", e.prefix, results["iteration"],
                         format_metrics({k: v for k, v in results.items()
                                         if k.startswith(f"{e.prefix}/") and "_se" not in k}, strip=f"{e.prefix}/"))
        self.latest = results
        return results
