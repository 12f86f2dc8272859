"""Our RLOO step against TRL's RLOOTrainer on one setting, run alternately in one session (docs/benchmarks.md, section 3).

    python bench/trl_compare.py                  # sets up bench/.venv-trl (TRL 1.16.0) on first use, then runs
    python bench/trl_compare.py --reps 5 --iters 4

The setting (bench/trl_worker.py, SETTING): a random-init 4 x 256 GPT-2 with the project's 8192-token BPE,
16 HH-RLHF training prompts of exactly 128 tokens x k=4 samples, 48 new tokens, beta 0.05, one update pass
in 2 optimizer steps of 32 sequences, fp32, 2 threads; reward: one frozen GPT-2 classifier object, called by
both trainers. Each run is a fresh process (its own peak RSS) under bench/.venv-trl, so both sides use the
same torch, transformers and environment. Allocator environments, each applied to both sides:
  default  glibc's defaults (our start-up mallopt turned off: the same allocator as TRL's run)
  tuned    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 for both
plus `ours+mallopt`: ours as train.py runs it, the default environment with infalign.runtime.allocator's start-up
tuning. The order of the sides rotates between repetitions; the first iteration of each run is warm-up and
dropped. Prints a Markdown table (medians over repetitions of each run's median, [min-max] over runs) and
writes every number to .cache/bench/trl_compare/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SETTING_DIR = REPO / ".cache" / "bench" / "trl_compare"
TUNED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
# (label, worker side, allocator environment, extra worker flags)
RUNS = {
    "default": [("ours", "ours", {}, []), ("trl", "trl", {}, []), ("ours+mallopt", "ours", {}, ["--tune-malloc"])],
    "tuned": [("ours", "ours", TUNED, []), ("trl", "trl", TUNED, [])],
}


def venv_python() -> str:
    subprocess.run(["bash", str(HERE / "setup_trl_env.sh")], check=True)
    return str(Path(os.environ.get("TRL_VENV", HERE / ".venv-trl")) / "bin" / "python")


def worker(python: str, args: list[str], malloc_env: dict, threads: int, timeout: int = 3600) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(malloc_env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), INFALIGN_MALLOC_TUNING="0",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    if "--tune-malloc" in args:
        env.pop("INFALIGN_MALLOC_TUNING")  # ours as shipped: train.py's start-up tuning on
    out = subprocess.run([python, str(HERE / "trl_worker.py"), *args, "--threads", str(threads)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def summarise(results: list[dict]) -> dict:
    """Per (env, label): median and [min-max] over every measured iteration of every run (warm-up dropped)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["env"], r["label"]), []).append(r)
    out = {}
    for (env, label), runs in groups.items():
        row = {"runs": len(runs), "iterations": sum(len(r["iter_s"]) - 1 for r in runs)}
        for key in ("iter_s", "cpu_s", "sys_s"):
            pooled = [x for r in runs for x in r[key][1:] if x == x] or [float("nan")]  # NaN: not recorded
            row[key] = {"median": st.median(pooled), "min": min(pooled), "max": max(pooled)}
        for key in ("peak_rss_mb", "rss_start_mb"):
            row[key] = st.median(r.get(key, float("nan")) for r in runs)
        phases = {}
        for name in runs[0].get("phases", {}):
            phases[name] = st.median(st.median(r["phases"][name][1:]) for r in runs if len(r["phases"].get(name, [])) > 1)
        row["phases"] = phases
        row["load"] = [r["load_before"] for r in runs]
        row["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in runs)
        out[f"{env}/{label}"] = row
    return out


def table(summary: dict) -> str:
    lines = ["| allocator | trainer | runs / iterations | wall s / iteration, median [min-max] | CPU s / iteration "
             "[min-max] | of which kernel | peak RSS MB | wall vs TRL | CPU vs TRL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, row in summary.items():
        env, label = key.split("/")
        trl = summary.get(f"{env}/trl")
        def ratio(key):
            return f"{row[key]['median'] / trl[key]['median']:.2f}" if trl and label != "trl" else ""

        it, cpu, sys_ = row["iter_s"], row["cpu_s"], row["sys_s"]
        lines.append(f"| {env} | {label} | {row['runs']} / {row['iterations']} | {it['median']:.1f} "
                     f"[{it['min']:.1f}-{it['max']:.1f}] | {cpu['median']:.2f} [{cpu['min']:.2f}-{cpu['max']:.2f}] | "
                     f"{sys_['median']:.2f} | {row['peak_rss_mb']:.0f} | {ratio('iter_s')} | {ratio('cpu_s')} |")
    lines.append("")
    lines.append("| allocator | trainer | phases, median s / iteration |\n| --- | --- | --- |")
    for key, row in summary.items():
        env, label = key.split("/")
        lines.append(f"| {env} | {label} | " + ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items()) + " |")
    return "\n".join(lines)


def runs_table(results: list[dict]) -> str:
    """One line per run, in the order they ran: the load they met shows which pairs are comparable."""
    lines = ["| run | allocator | trainer | load at start | wall s / iteration (median) | CPU s / iteration | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(results):
        lines.append(f"| {i + 1} | {r['env']} | {r['label']} | {r['load_before']:.1f} | {st.median(r['iter_s'][1:]):.1f} | "
                     f"{st.median(r['cpu_s'][1:]):.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="runs of each side in each allocator environment")
    ap.add_argument("--iters", type=int, default=3, help="measured RL iterations per run (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--envs", default="default,tuned")
    ap.add_argument("--out", type=Path, default=SETTING_DIR / "results.json")
    ap.add_argument("--report", type=Path, nargs="+", help="only print the tables of saved runs (results or .partial.json)")
    a = ap.parse_args()
    if a.report:
        runs = []
        for path in a.report:
            data = json.loads(path.read_text())
            runs += data["runs"] if isinstance(data, dict) else data
        return print(table(summarise(runs)) + "\n\n" + runs_table(runs))
    python = venv_python()
    if not (SETTING_DIR / "setting.json").exists():
        SETTING_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, str(HERE / "trl_worker.py"), "build", "--dir", str(SETTING_DIR)], check=True, cwd=REPO)
    results, started = [], time.time()
    for rep in range(a.reps):
        for e, env in enumerate(a.envs.split(",")):
            runs = RUNS[env]
            shift = (rep + e) % len(runs)  # rotate who goes first
            for label, side, malloc_env, flags in runs[shift:] + runs[:shift]:
                load = os.getloadavg()[0]
                r = worker(python, [side, "--dir", str(SETTING_DIR), "--iters", str(a.iters + 1), *flags], malloc_env,
                           a.threads)
                r.update(env=env, label=label, rep=rep, load_before=round(load, 2))
                results.append(r)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.with_suffix(".partial.json").write_text(json.dumps(results))  # survives an interrupted session
                print(f"[{time.time() - started:5.0f} s] rep {rep} {env:7s} {label:13s} "
                      f"s/iter {[round(x, 2) for x in r['iter_s']]} cpu {[round(x, 2) for x in r['cpu_s']]} "
                      f"peak {r['peak_rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    summary = summarise(results)
    meta = json.loads((SETTING_DIR / "setting.json").read_text())
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0],
               "torch": results[0]["torch"], "trl": next(r["trl"] for r in results if "trl" in r), "threads": a.threads}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"setting": meta, "machine": machine, "summary": summary, "runs": results}, indent=1))
    print(f"\nsetting: {json.dumps(meta)}\nmachine: {json.dumps(machine)}\n")
    print(table(summary) + "\n\n" + runs_table(results))
    print(f"\nall numbers: {a.out}")


if __name__ == "__main__":
    main()
