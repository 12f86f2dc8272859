"""Soak benchmark (issue 7; docs/benchmarks.md section 5): does anything grow or linger over many runs?

1. `--runs` smoke runs back to back **in one process** (`infalign.trainer.inprocess.run_in_process`), as a notebook or
   a driver script would: resident memory (RSS), open file descriptors and threads after each run. Separate
   processes would hide a leak; one process accumulates it.
2. One multirun of 6 x `--sweep-seeds` members (`python train.py -m ...`: the members run one after another in
   one process), sampled from outside through /proc while it runs.
3. Leftover temporary files (`*.tmp`, `.tmp-*`, `.trash-*`) anywhere under the run directories and the cache.

    OMP_NUM_THREADS=1 python bench/soak.py --runs 20 --sweep-seeds 1 --out soak.json

Linux only (/proc). Runs offline: W&B in offline mode, the smoke models from the cache (built on first use).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["scale=smoke", "progress=false", "num_threads=1"]
MULTIRUN = ["transform=bon_exp,identity,won_exp", "n=2,4"]  # 3 x 2 = 6 members


def proc_stats(pid: int | str = "self") -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    field = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
    return {"rss_mb": int(field["VmRSS"].split()[0]) / 1024, "threads": int(field["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def leftovers(*roots: Path) -> list[str]:
    bad = []
    for root in roots:
        for p in root.rglob("*"):
            if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".trash-")) or ".tmp." in p.name:
                bad.append(str(p))
    return bad


def in_process_runs(n: int, base: Path, logger: str) -> list[dict]:
    from infalign.trainer.inprocess import run_in_process

    rows = []
    for i in range(n):
        t0 = time.time()
        final = run_in_process([*SMOKE, f"logger={logger}"], base / f"run{i:02d}")
        gc.collect()
        rows.append({"run": i + 1, "seconds": round(time.time() - t0, 2), **proc_stats(),
                     "bon_win_rate@4": final["eval/bon_win_rate@4"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def multirun(seeds: int, sweep: Path, logger: str) -> dict:
    seed_list = ",".join(str(i) for i in range(seeds))
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *SMOKE, f"logger={logger}", *MULTIRUN, f"seed={seed_list}",
           f"hydra.sweep.dir={sweep}"]
    members = 6 * seeds
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    per_member, seen = [], 0
    while proc.poll() is None:
        try:
            stats = proc_stats(proc.pid)
        except (FileNotFoundError, ProcessLookupError, KeyError):
            break
        done = len(list(sweep.glob("*/final_metrics.json")))
        if done > seen:  # sampled right after a member wrote its final metrics
            seen = done
            per_member.append({"member": done, "seconds": round(time.time() - t0, 1), **stats})
            print(json.dumps(per_member[-1]), flush=True)
        time.sleep(0.1)
    err = proc.communicate()[1]
    if proc.returncode != 0:
        raise SystemExit(f"multirun failed ({proc.returncode}):\n{err[-3000:]}")
    return {"members": members, "finished": len(list(sweep.glob("*/final_metrics.json"))),
            "seconds": round(time.time() - t0, 1), "per_member": per_member,
            "summary_written": (sweep / "sweep_summary.csv").is_file()}


def growth(rows: list[dict], key: str, start: int = 1) -> float:
    """Change of `key` from the row at index `start` (after warm-up) to the last."""
    return round(rows[-1][key] - rows[start][key], 2) if len(rows) > start else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sweep-seeds", type=int, default=1, help="the sweep has 3 transforms x 2 n x this many seeds")
    ap.add_argument("--logger", default="wandb", help="wandb (offline; the default config) or none")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--workdir", type=Path, default=None, help="run dirs go here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    base = args.workdir or Path(tempfile.mkdtemp(prefix="infalign-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    from infalign.runtime.paths import cache_root

    cache = Path(cache_root())
    runs = in_process_runs(args.runs, base / "single", args.logger)
    sweep = multirun(args.sweep_seeds, base / "sweep", args.logger)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "in_process": {"runs": runs, "rss_growth_mb_after_run_2": growth(runs, "rss_mb"),
                       "fd_growth_after_run_2": growth(runs, "fds"),
                       "thread_growth_after_run_2": growth(runs, "threads"),
                       "identical_results": len({r["bon_win_rate@4"] for r in runs}) <= 1},
        "multirun": {**sweep, "rss_growth_mb_after_member_2": growth(sweep["per_member"], "rss_mb"),
                     "fd_growth_after_member_2": growth(sweep["per_member"], "fds")},
        "leftover_temp_files": leftovers(base, cache),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "in_process"}, indent=1))
    print(json.dumps({k: v for k, v in result["in_process"].items() if k != "runs"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
