"""Benchmark the trainer on a config: time per RL iteration split into generate / score / calibrate /
logprobs / update, rollout tokens/s, calibration-cache build time, and the sweep speed-up from sharing it.

    python bench/train_bench.py                      # the default config (models built first if missing)
    python bench/train_bench.py scale=smoke          # any train.py overrides

It runs `train.py` once with a fresh calibration seed (so the calibration cache is built and timed), reads
the per-iteration timings that the trainer logs to logs/metrics.csv, and prints a Markdown table.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ["time/generate", "time/score", "time/calibrate", "time/logprobs", "time/update"]


def main(overrides: list[str]) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="infalign-bench-"))
    calib_seed = int(time.time()) % 100000  # a new calibration-cache key: measures its build
    cmd = [sys.executable, str(REPO / "train.py"), "logger=none", "progress=false", "eval.every=0",
           f"calibration.seed={calib_seed}", f"hydra.run.dir={run_dir}", *overrides]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - t0
    final = json.loads((run_dir / "final_metrics.json").read_text())
    manifest = json.loads((Path(final["calibration_cache"]) / "manifest.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    per_iter = {k: [float(r[f"train/{k}"]) for r in rows if r.get(f"train/{k}")] for k in PHASES}
    key = "train/throughput/generated_tokens_per_s"
    tok_s = [float(r[key]) for r in rows if r.get(key)]
    med = {k: statistics.median(v[1:] or v) for k, v in per_iter.items()}  # drop the first (warm-up)
    total = sum(med.values())
    cache_s = manifest["build_seconds"]
    train_s = sum(sum(v) for v in per_iter.values())
    members = 6
    speedup = members * (cache_s + train_s) / (cache_s + members * train_s)
    print(f"\n### `python bench/train_bench.py {' '.join(overrides)}`\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default; "
          f"wall {wall:.0f} s for the whole command (models from cache)\n")
    print("| phase | median s / iteration | share |\n| --- | --- | --- |")
    for k in PHASES:
        print(f"| {k[5:]} | {med[k]:.3f} | {med[k] / total:.0%} |")
    print(f"| **total** | **{total:.3f}** | |")
    print(f"\nrollout generation: median {statistics.median(tok_s):.0f} new tokens/s; "
          f"calibration cache build: {cache_s:.1f} s ({manifest['meta']['prompts']} prompts x M={manifest['meta']['m']}); "
          f"RL iterations: {train_s:.1f} s in all; a {members}-member sweep sharing the cache: "
          f"{speedup:.2f}x faster than building it per member")
    print(f"final: {json.dumps({k: v for k, v in final.items() if k.startswith('eval/') and '@' in k and '_se' not in k})}")


if __name__ == "__main__":
    main(sys.argv[1:])
