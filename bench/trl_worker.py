"""One side of the TRL comparison, run in a fresh process by bench/trl_compare.py (a process per run, so
its peak RSS is that run's own). Three commands:

    python bench/trl_worker.py build --dir D            # the shared setting: policy, reward model, prompts
    python bench/trl_worker.py ours  --dir D --iters N  # our RLOO step (InfAlignModule under Lightning)
    python bench/trl_worker.py trl   --dir D --iters N  # TRL's RLOOTrainer on the same setting

`ours`/`trl` print one JSON line: seconds per iteration (end-to-end, the same clock on both sides), the
phase split each trainer reports, peak RSS and RSS when training starts. Both sides load the same
safetensors policy (their reference is a second copy of it), score with the same reward-model object
and see the same prompt texts (every prompt exactly `prompt_tokens` tokens, so no side pads more).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

SETTING = {  # the reference setting
    "policy": {"n_layer": 4, "n_embd": 256, "n_head": 4, "dropout": 0.0},
    "reward": {"n_layer": 2, "n_embd": 128, "n_head": 2},
    "prompts_per_iteration": 16, "k": 4, "prompt_tokens": 128, "max_new_tokens": 48, "beta": 0.05,
    "minibatch_size": 32, "lr": 1e-4, "grad_clip": 1.0, "pool": 256, "seed": 0,
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stamp() -> tuple[float, float, float]:
    """(wall, user CPU, system CPU) seconds: CPU time is less disturbed than wall time on a shared machine,
    and system time is where the allocator's page faults show."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime


def per_iteration(stamps: list[tuple[float, float, float]]) -> dict:
    d = [tuple(b - a for a, b in zip(x, y)) for x, y in zip(stamps, stamps[1:])]
    return {"iter_s": [x[0] for x in d], "cpu_s": [x[1] + x[2] for x in d], "sys_s": [x[2] for x in d]}


# ------------------------------------------------------------------------------------------ the setting
def exact_tail(text: str, tokenizer, n: int) -> str | None:
    """The shortest suffix of `text` that is exactly `n` tokens (None if the prompt is shorter). Cut at the
    text level so both trainers re-tokenize it to the same `n` ids."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    if count(text) < n:
        return None
    lo, hi = 0, len(text)
    while lo < hi:  # the largest start whose suffix still has >= n tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(text[mid:]) >= n else (lo, mid - 1)
    tail = text[lo:]
    return tail if count(tail) == n else None


def build(out: Path) -> None:
    from hydra import compose, initialize_config_dir
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from infalign.models.data import load_partitions, partition_fingerprint
    from infalign.models.policy import gpt2_config
    from infalign.models.tokenizer import load_or_train_tokenizer
    from infalign.runtime.paths import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train")
    parts = load_partitions(cfg.data)
    tok, _ = load_or_train_tokenizer(cfg.model.tokenizer, parts["train"], partition_fingerprint(parts), cfg.cache_root)
    n_pos = SETTING["prompt_tokens"] + SETTING["max_new_tokens"] + 1
    torch.manual_seed(SETTING["seed"])
    # A random-init policy of the reference size: the timing depends on shapes, not on what it learned.
    policy = GPT2LMHeadModel(gpt2_config(SETTING["policy"], tok, n_pos))
    policy.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    rm_cfg = gpt2_config({**SETTING["reward"], "dropout": 0.0}, tok, 512)
    rm_cfg.num_labels = 1
    GPT2ForSequenceClassification(rm_cfg).save_pretrained(out / "reward")
    prompts, seen = [], set()
    for r in parts["train"]:
        tail = exact_tail(r.prompt, tok, SETTING["prompt_tokens"]) if r.prompt_id not in seen else None
        seen.add(r.prompt_id)
        if tail is not None:
            prompts.append(tail)
        if len(prompts) == SETTING["pool"]:
            break
    n_params = sum(p.numel() for p in policy.parameters())
    meta = {**SETTING, "policy_params": n_params, "n_prompts": len(prompts)}
    (out / "prompts.json").write_text(json.dumps(prompts))
    (out / "setting.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))


def load_setting(d: Path):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

    from infalign.models.reward import SequenceClassifierReward

    meta = json.loads((d / "setting.json").read_text())
    tok = AutoTokenizer.from_pretrained(d / "policy", padding_side="left")
    policy = GPT2LMHeadModel.from_pretrained(d / "policy")
    rm = SequenceClassifierReward(GPT2ForSequenceClassification.from_pretrained(d / "reward"), tok,
                                  max_prompt_tokens=meta["prompt_tokens"], max_response_tokens=meta["max_new_tokens"])
    return meta, tok, policy, rm, json.loads((d / "prompts.json").read_text())


# ----------------------------------------------------------------------------------------------- ours
def run_ours(d: Path, iters: int) -> dict:
    import lightning as L

    from infalign.core.calibration import PassThroughCalibrator
    from infalign.core.transforms import RawTransform
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.trainer.calibration_cache import CachedSamples, ReferenceSamples
    from infalign.trainer.datamodule import RolloutDataModule
    from infalign.trainer.experience import RolloutBuilder
    from infalign.trainer.module import InfAlignModule
    from infalign.trainer.prompts import Prompt
    from infalign.trainer.solvers.rloo import RLOO

    meta, tok, policy, rm, prompts = load_setting(d)
    # TRL optimises the raw reward minus beta * KL(k1, per sequence): the same objective here
    # (calibrator=passthrough transform=raw); CTRL's calibrate step is timed in section 4 of docs/benchmarks.md.
    solver = RLOO(beta=meta["beta"], k=meta["k"], minibatch_size=meta["minibatch_size"],
                  prompts_per_iteration=meta["prompts_per_iteration"], grad_clip=meta["grad_clip"])
    # the optimizer of conf/train.yaml (AdamW, betas 0.9 / 0.95, no weight decay) at the setting's lr
    optimizer = functools.partial(torch.optim.AdamW, lr=meta["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    module = InfAlignModule(policy, tok, rm, PassThroughCalibrator(), RawTransform(), solver=solver,
                            optimizer=optimizer, iterations=iters, seed=meta["seed"])
    items = [Prompt(f"p{i}", p, p) for i, p in enumerate(prompts)]
    no_refs = ReferenceSamples([], torch.zeros(0, 1), [])  # passthrough never asks for reference rewards
    builder = RolloutBuilder(policy=module.policy, reference=module.reference, tokenizer=tok, reward_model=rm,
                             calibrator=module.calibrator, transform=module.transform,
                             gen_kwargs=sampling_kwargs({"max_new_tokens": meta["max_new_tokens"]}), seed=meta["seed"],
                             calibration=CachedSamples.ready(no_refs))
    dm = RolloutDataModule(items, builder, solver, meta["prompts_per_iteration"], meta["seed"])
    ends, phases = [], defaultdict(list)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            ends.append(stamp())
            result["rss_start_mb"] = rss_mb()

        def on_train_epoch_end(self, trainer, pl_module):
            ends.append(stamp())
            for k, v in trainer.callback_metrics.items():
                if k.startswith("train/time/"):
                    phases[k[len("train/time/"):]].append(float(v))

    result = {}
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=iters, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(module, datamodule=dm)
    return {**result, **per_iteration(ends), "phases": dict(phases)}


# ------------------------------------------------------------------------------------------------ TRL
def run_trl(d: Path, iters: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer
    from trl.extras import profiling

    meta, tok, policy, rm, prompts = load_setting(d)
    # Same tokens on both sides: TRL tokenizes the prompt text itself (with special tokens; ours adds none).
    assert len(tok(prompts[0])["input_ids"]) == meta["prompt_tokens"]
    steps_per_iter = meta["prompts_per_iteration"] * meta["k"] // meta["minibatch_size"]

    def frozen_rm(prompts, completions, **_):  # the very scorer our trainer calls
        return rm.score(list(prompts), list(completions)).tolist()

    # TRL times its own phases (generate, log-prob passes, reward, loss) with profiling contexts: collect them.
    phases = defaultdict(float)
    original = profiling.ProfilingContext._log_metrics

    def collect(self, duration):
        phases[self.name.split(".", 1)[1]] += duration
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = collect
    ends, per_phase, result = [], defaultdict(list), {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(stamp())
            result["rss_start_mb"] = rss_mb()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_iter == 0:  # one RL iteration = one generation batch
                ends.append(stamp())
                for k, v in phases.items():
                    per_phase[k].append(v)
                phases.clear()

    with tempfile.TemporaryDirectory() as out:
        args = RLOOConfig(
            output_dir=out, per_device_train_batch_size=meta["minibatch_size"], steps_per_generation=steps_per_iter,
            num_generations=meta["k"], max_completion_length=meta["max_new_tokens"], beta=meta["beta"],
            num_iterations=1, learning_rate=meta["lr"], max_grad_norm=meta["grad_clip"], lr_scheduler_type="constant",
            max_steps=iters * steps_per_iter, temperature=1.0, top_k=0, top_p=1.0, disable_dropout=True,
            use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=10**6,
            seed=meta["seed"], dataloader_num_workers=0)
        trainer = RLOOTrainer(model=policy, reward_funcs=[frozen_rm], args=args, processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[Clock()])
        trainer.train()
    return {**result, **per_iteration(ends), "phases": dict(per_phase),
            "trl": trl.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=["build", "ours", "trl"])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tune-malloc", action="store_true", help="apply infalign's own mallopt tuning first")
    a = ap.parse_args()
    if a.tune_malloc:
        from infalign.runtime.allocator import tune_malloc

        tune_malloc()
    torch.set_num_threads(a.threads)
    if a.side == "build":
        a.dir.mkdir(parents=True, exist_ok=True)
        return build(a.dir)
    res = (run_ours if a.side == "ours" else run_trl)(a.dir, a.iters)
    res.update(side=a.side, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads(),
               torch=torch.__version__, malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
