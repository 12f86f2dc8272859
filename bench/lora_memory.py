"""LoRA's cost and saving (issue 16, item 2): peak RSS and seconds per RL iteration of a short run of a model
preset, with the whole policy training and with LoRA adapters (and gradient checkpointing).

    nice python bench/lora_memory.py model=smollm2                      # full vs LoRA r=16 vs LoRA + checkpointing
    python bench/lora_memory.py model=smollm2 --rank 8 --variants full,lora,full+gc
    python bench/lora_memory.py scale=smoke --doc /tmp/lora_memory.md   # a seconds-sized dry run of the script

Each variant is its own `python train.py` process, so its peak RSS (`ru_maxrss` from `wait4`) is its own: the
script's short-run sizes first (`--keep-sizes`: none, the preset's own), then the overrides given, then the variant's
`model.lora.r` / `model.gradient_checkpointing`. A first, unmeasured run (skip it with `--no-warmup`) builds or
loads the models and the calibration cache, which every variant then shares (`model.lora` is not in the calibration
cache's key), so no variant pays for a build. Seconds per iteration: the median, over the iterations after the first,
of the phases the trainer logs (generate, score, calibrate, logprobs, update); the update alone too, since that is
where LoRA and checkpointing act. Writes a Markdown table headed by the command to `--doc` (default
docs/lora_memory.md) and prints it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ["time/generate", "time/score", "time/calibrate", "time/logprobs", "time/update"]
# a short run: a few iterations of a few prompts, a small calibration cache and evaluation (all overridable)
SIZES = ["rl.prompts_per_iteration=4", "rl.k=4", "rl.minibatch_size=8", "data.train_prompts=8",
         "data.eval_prompts=4", "calibration.m=4", "n=2", "eval.ns=[1,2]", "eval.k=4"]
ALWAYS = ["logger=none", "progress=false", "eval.every=0", "checkpoint.every=0"]
# "full" says r=0 itself: a preset may turn LoRA on (scale=smollm2 does)
VARIANTS = {"full": ["model.lora.r=0"], "lora": ["model.lora.r={rank}"],
            "lora+gc": ["model.lora.r={rank}", "model.gradient_checkpointing=true"],
            "full+gc": ["model.lora.r=0", "model.gradient_checkpointing=true"]}


def run_train(overrides: list[str], run_dir: Path) -> dict:
    """`python train.py <overrides>` in its own process: wall seconds, peak RSS (MB) and its log."""
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "bench.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "log": log_path.read_text()}  # ru_maxrss: KiB on Linux


def phases(run_dir: Path) -> dict:
    rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("train/time/update")]
    if not rows:
        raise SystemExit(f"{run_dir}/logs/metrics.csv holds no iteration timings")
    rows = rows[1:] or rows  # the first iteration warms up
    total = [sum(float(r[f"train/{k}"]) for k in PHASES if r.get(f"train/{k}")) for r in rows]
    return {"iteration_s": statistics.median(total), "update_s": statistics.median(float(r["train/time/update"])
                                                                                   for r in rows),
            "iterations": len(rows)}


def trainable(log: str) -> str:
    match = re.search(r"LoRA r=\d+ on .*?: ([\d,]+) of ([\d,]+) policy parameters train \(([\d.]+)%\)", log)
    return f"{match.group(1)} of {match.group(2)} ({match.group(3)}%)" if match else "all"


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py overrides: the model preset (model=smollm2) and any others")
    ap.add_argument("--rank", type=int, default=16, help="model.lora.r of the LoRA variants")
    ap.add_argument("--variants", default="full,lora,lora+gc", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--iterations", type=int, default=4, help="rl.iterations of each run (the first is not timed)")
    ap.add_argument("--threads", type=int, default=None, help="num_threads of each run (default: torch's)")
    ap.add_argument("--keep-sizes", action="store_true", help="the preset's own sizes instead of the short run's")
    ap.add_argument("--no-warmup", action="store_true", help="no unmeasured first run (the caches are built already)")
    ap.add_argument("--doc", default=str(REPO / "docs" / "lora_memory.md"), help="where the Markdown table goes")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")

    from infalign.runtime.atomic import atomic_write_text

    base = [*([] if args.keep_sizes else SIZES), *args.overrides, *ALWAYS, f"rl.iterations={args.iterations}",
            *([f"num_threads={args.threads}"] if args.threads else [])]
    work = Path(tempfile.mkdtemp(prefix="infalign-lora-bench-"))
    load_before = load_average()
    if not args.no_warmup:  # builds/loads the models and the calibration cache that the variants share
        print("warm-up run (models and calibration cache) ...", file=sys.stderr, flush=True)
        run_train([*base, "rl.iterations=1"], work / "warmup")
    results = []
    for name in variants:
        extra = [o.format(rank=args.rank) for o in VARIANTS[name]]
        print(f"{name}: {' '.join(extra) or '(whole policy)'} ...", file=sys.stderr, flush=True)
        run_dir = work / name.replace("+", "_")
        out = run_train([*base, *extra], run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        results.append({"variant": name, "overrides": " ".join(extra), **phases(run_dir), "rss_mb": out["rss_mb"],
                        "wall": out["wall"], "trainable": trainable(out["log"]),
                        "checkpoint_mb": ckpt.stat().st_size / 2**20 if ckpt.exists() else float("nan")})
    load_after = load_average()

    import torch

    command = " ".join(["python bench/lora_memory.py", shlex.join(sys.argv[1:])]).strip()
    lines = [f"### `{command}`", "",
             f"{dt.datetime.now():%Y-%m-%d %H:%M}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, threads {args.threads or 'default'}; load average {load_before:.2f} before, "
             f"{load_after:.2f} after. Each run: `python train.py {shlex.join(base)}` + the variant's overrides; "
             f"{results[0]['iterations'] if results else 0} timed iterations (the first of {args.iterations} not timed).",
             "", "| variant | overrides | trainable parameters | peak RSS (MB) | s / iteration | update s / iteration "
             "| checkpoint (MB) | wall s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['variant']} | `{r['overrides'] or '-'}` | {r['trainable']} | {r['rss_mb']:.0f} | "
                     f"{r['iteration_s']:.2f} | {r['update_s']:.2f} | {r['checkpoint_mb']:.1f} | {r['wall']:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.doc, text)
    print(text)
    print(f"wrote {args.doc}; runs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
