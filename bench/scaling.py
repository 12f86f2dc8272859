"""Cost as work grows (docs/benchmarks.md, section 4): seconds per RL iteration, split into the phases the
trainer logs (generate / score / calibrate / logprobs / update), against one factor at a time: k samples per
prompt, prompts per iteration, response length, M reference samples, N of the transform; plus the
calibration-cache build against M.

    python bench/scaling.py                        # default models (built first if missing), about 15 min on 2 cores
    python bench/scaling.py --quick                # 2 values per factor, 1 measured iteration (a smoke check)

One process, models loaded once; every point builds a fresh InfAlignModule and Lightning Trainer exactly as
train.py does (calibrator=empirical, transform=bon_exp, RLOO), runs 1 warm-up + `--iters` iterations and
keeps the median of each phase. Calibration caches go to a temporary cache root, so each M is built (and
timed) once. Writes docs/scaling.png and .cache/bench/scaling.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PHASES = ["generate", "score", "calibrate", "logprobs", "update"]
BASE = {"k": 4, "prompts": 4, "response_tokens": 32, "m": 8, "n": 4}
SWEEPS = {"k": [2, 4, 8, 16], "prompts": [2, 4, 8, 16], "response_tokens": [16, 32, 64], "m": [4, 8, 16, 32],
          "n": [1, 2, 4, 8]}
LABELS = {"k": "k (samples per prompt)", "prompts": "prompts per iteration", "response_tokens": "response tokens",
          "m": "M (reference samples)", "n": "N (best-of-N)"}


def compose(point: dict):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from infalign.runtime.paths import conf_dir

    overrides = [f"rl.k={point['k']}", f"rl.prompts_per_iteration={point['prompts']}",
                 f"data.train_prompts={point['prompts']}", f"calibration.m={point['m']}", f"n={point['n']}",
                 f"generation.max_new_tokens={point['response_tokens']}", "eval.ns=[1]", f"eval.k={point['n']}",
                 "data.eval_prompts=1", "logger=none"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def measure(point: dict, models, cache_root: str, iters: int) -> dict:
    """Phase medians for one point (like train.py, without evaluation, checkpoints or loggers)."""
    import lightning as L
    from hydra.utils import instantiate

    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.trainer.calibration_cache import CachedSamples, load_or_build_reference_samples
    from infalign.trainer.datamodule import RolloutDataModule
    from infalign.trainer.experience import RolloutBuilder
    from infalign.trainer.module import InfAlignModule
    from infalign.trainer.pieces import build_solver
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    partitions, reference, tokenizer, reward_model = models
    cfg = compose(point)
    train_prompts, _ = _prompt_sets(cfg, partitions, tokenizer)
    gen_kwargs = sampling_kwargs(cfg.generation)
    key = {"bench": "scaling", "prompts": [p[0] for p in train_prompts], "m": point["m"], "gen": gen_kwargs}
    t0 = time.perf_counter()
    refs = load_or_build_reference_samples(
        cache_root=cache_root, key=key, prompt_ids=[p[0] for p in train_prompts], prompts=[p[1] for p in train_prompts],
        reward_prompts=[p[2] for p in train_prompts], reference=reference, tokenizer=tokenizer,
        reward_model=reward_model, m=point["m"], gen_kwargs=gen_kwargs, seed=0, progress=False)
    cache_s = time.perf_counter() - t0 if not refs.cache_hit else None
    calibrator, transform, solver = instantiate(cfg.calibrator), instantiate(cfg.transform), build_solver(cfg)
    module = InfAlignModule(reference, tokenizer, reward_model, calibrator, transform, solver=solver,
                            optimizer=instantiate(cfg.optimizer, _convert_="all"), iterations=iters + 1, seed=0)
    builder = RolloutBuilder(policy=module.policy, reference=reference, tokenizer=tokenizer, reward_model=reward_model,
                             calibrator=calibrator, transform=transform, gen_kwargs=gen_kwargs, seed=0,
                             calibration=CachedSamples.ready(refs))
    dm = RolloutDataModule(train_prompts, builder, solver, point["prompts"], 0)
    rows, ends = [], []

    class Clock(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            ends.append((time.perf_counter(), cpu_seconds()))

        def on_train_epoch_end(self, trainer, pl_module):
            rows.append({**{p: float(trainer.callback_metrics[f"train/time/{p}"]) for p in PHASES},
                         "iteration": time.perf_counter() - ends[-1][0], "cpu": cpu_seconds() - ends[-1][1]})

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=iters + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(module, datamodule=dm)
    reference.requires_grad_(False)  # the module made it frozen; keep it so for the next point
    out = {k: st.median(r[k] for r in rows[1:]) for k in [*PHASES, "iteration", "cpu"]}
    return {**point, **out, "cache_build_s": cache_s, "load": round(os.getloadavg()[0], 2)}


def cpu_seconds() -> float:
    """User + system CPU time of this process: less disturbed than wall time by other jobs on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_models():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.reward import load_reward_model
    from infalign.runtime.paths import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = hydra_compose("train")
    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    reward_model = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions,
                                     progress=False)
    n_params = sum(p.numel() for p in reference.parameters())
    return (partitions, reference, tokenizer, reward_model), n_params


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [f for f in SWEEPS if any(r["factor"] == f for r in results)]
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.6), squeeze=False)
    axes = axes[0]
    colors = dict(zip(PHASES, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]))
    for ax, factor in zip(axes, factors):
        pts = [r for r in results if r["factor"] == factor]
        xs = [r[factor] for r in pts]
        bottom = [0.0] * len(pts)
        for p in PHASES:
            # CPU seconds of the iteration split by the phases' shares of its wall time: on a machine shared
            # with other jobs, CPU time is the steadier total, and the shares hold under a steady load
            ys = [r[p] / sum(r[q] for q in PHASES) * r["cpu"] for r in pts]
            ax.bar(range(len(pts)), ys, bottom=bottom, color=colors[p], label=p)
            bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_xticks(range(len(pts)), [str(x) for x in xs])
        ax.set_xlabel(LABELS[factor])
        if factor == "m" and any(r["cache_build_s"] for r in pts):
            tw = ax.twinx()
            tw.plot(range(len(pts)), [r["cache_build_s"] or float("nan") for r in pts], "k--o", ms=3)
            tw.set_ylabel("calibration cache build, s (dashed)")
    axes[0].set_ylabel("CPU s per RL iteration (1 thread)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Cost per RL iteration as work grows (one factor at a time; base: "
                 + ", ".join(f"{k}={v}" for k, v in BASE.items()) + ")", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def table(results: list[dict]) -> str:
    lines = ["| factor | value | s / iteration | CPU s | generate | score | calibrate | logprobs | update | dominant | "
             "cache build s | load |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        dom = max(PHASES, key=lambda p: r[p])
        build = f"{r['cache_build_s']:.1f}" if r["cache_build_s"] else ""
        lines.append(f"| {r['factor']} | {r[r['factor']]} | {r['iteration']:.2f} | {r['cpu']:.2f} | "
                     + " | ".join(f"{r[p]:.2f}" for p in PHASES)
                     + f" | {dom} ({r[dom] / r['iteration']:.0%}) | {build} | {r['load']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2, help="measured iterations per point (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--factors", default=",".join(SWEEPS), help="comma-separated subset of " + ",".join(SWEEPS))
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "scaling.png")
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "scaling.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot and table from --out")
    a = ap.parse_args()
    if a.replot:
        results = json.loads(a.out.read_text())["results"]
        plot(results, a.plot)
        return print(table(results))
    torch.set_num_threads(a.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    sweeps = {f: SWEEPS[f][:2] if a.quick else SWEEPS[f] for f in a.factors.split(",")}
    iters = 1 if a.quick else a.iters
    models, n_params = load_models()
    results, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="infalign-scaling-") as cache_root:
        for factor, values in sweeps.items():
            for v in values:
                r = measure({**BASE, factor: v}, models, cache_root, iters)
                r["factor"] = factor
                results.append(r)
                print(f"[{time.time() - started:5.0f} s] {factor}={v}: {r['iteration']:.2f} s/iteration "
                      + " ".join(f"{p} {r[p]:.2f}" for p in PHASES), flush=True)
    meta = {"base": BASE, "policy_params": n_params, "threads": a.threads, "iters": iters, "cores": os.cpu_count(),
            "torch": torch.__version__, "python": sys.version.split()[0], "wall_s": round(time.time() - started)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, a.plot)
    print(f"\n{json.dumps(meta)}\n\n{table(results)}\n\nplot: {a.plot}  numbers: {a.out}")


if __name__ == "__main__":
    main()
