"""How long `python train.py` takes to refuse a bad value (issue 17: within 3 s on 2 cores).

Times `--reps` runs of each bad command as a subprocess (wall time from start to exit, Python's start-up, Hydra's
composition and the config check, `infalign.config.check`, included) and prints a markdown table (median and max
per command) with the commands, for docs/benchmarks.md. The cases are the torch-free check's rows of the bad-input table
(tests/bad_input_cases.py; those the command line alone makes, with no setup); by default the user's reports of
issue 17, `--all` for every such case. A Hydra error of its own (`transform=foo`) is timed too, for comparison.
Run it on a quiet machine:

    python bench/config_check_time.py                 # 6 cases + Hydra's own error, 5 runs each
    python bench/config_check_time.py --all --reps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["scale=smoke", "logger=none"]
REPORTED = [("optimizer.lr=-1",), ("seed=abc",), ("eval.ns=[0]",), ("trainer.max_epochs=5",),
            ("+trainer.accumulate_grad_batches=2",), ("num_threads=0",)]
HYDRA_OWN = ("transform=foo",)  # refused by Hydra itself (an unknown option): the floor of any check


def load_cases():
    spec = importlib.util.spec_from_file_location("bad_input_cases", REPO / "tests" / "bad_input_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is made
    spec.loader.exec_module(module)
    return [c for c in module.CASES if c.stage == "schema" and not c.setup]


def time_command(overrides: tuple[str, ...], reps: int) -> tuple[list[float], set[int]]:
    seconds, codes = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            cmd = [sys.executable, str(REPO / "train.py"), *BASE, *overrides, f"hydra.run.dir={tmp}/{i}"]
            started = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            seconds.append(time.perf_counter() - started)
            codes.add(out.returncode)
    return seconds, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="runs per command (default 5)")
    parser.add_argument("--all", action="store_true", help="every torch-free case of tests/bad_input_cases.py")
    args = parser.parse_args()
    cases = [c.overrides for c in load_cases()] if args.all else REPORTED
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"`python train.py {' '.join(BASE)} <override>`, {args.reps} runs each; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {load:.2f} at the start, "
          f"Python {platform.python_version()}\n")
    print("| override | exit status | median (s) | max (s) |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for overrides in [*cases, HYDRA_OWN]:
        seconds, codes = time_command(overrides, args.reps)
        worst = max(worst, max(seconds)) if overrides != HYDRA_OWN else worst
        label = " ".join(overrides) + (" (Hydra's own error)" if overrides == HYDRA_OWN else "")
        print(f"| `{label}` | {', '.join(map(str, sorted(codes)))} | {statistics.median(seconds):.2f} | "
              f"{max(seconds):.2f} |")
    print(f"\nslowest refusal by the config check: {worst:.2f} s")


if __name__ == "__main__":
    main()
