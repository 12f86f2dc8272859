"""Compare two source trees ("before" and "after") phase by phase, in one run, alternating A B A B.

    python bench/phase_compare.py --before /path/to/old/checkout                  # the default config, 2 pairs
    python bench/phase_compare.py --before ../base --pairs 3 --iterations 8 scale=smoke
    python bench/phase_compare.py --before ../base --what train,build --threads 2

Options: --after (default: this checkout), --pairs (runs per tree), --iterations (rl.iterations of every
training run), --what (train, build or both), --threads (OMP_NUM_THREADS / MKL_NUM_THREADS of every
subprocess; default: torch's own default), --out (default outputs/bench), --before-cache / --after-cache
(cache_root of each tree's training runs; default <tree>/.cache, so the models that tree already built are
reused), --no-prebuild, --keep. Trailing arguments are Hydra overrides given to both trees' train.py.

Every run is a subprocess that imports its own tree's code (PYTHONPATH=<tree>/src, cwd=<tree>, checked at
start): a pair is one run of each tree back to back, so slow drift in the machine's load hits both alike, and
each ratio after/before is taken within a pair before the median over pairs.

--what train: `<tree>/train.py logger=none progress=false eval.every=0 rl.iterations=I calibration.seed=S`
with a new calibration seed per pair (a key no cache holds: the calibration cache is built and timed; the two
trees of a pair share it, so they sample the same work). Read per run: the phase timings the trainer logs to
logs/metrics.csv (median over iterations, the first dropped as warm-up), rollout tokens/s, the calibration
cache's manifest `build_seconds`, the run's own `wall_seconds` (final_metrics.json), and the subprocess's wall
and CPU time. The trainer logs no time for model loading or the final evaluation: they are inside the walls.
Before the first pair each tree loads (or, if missing, builds) its models once with
`python -m infalign.models.build` and the model-related overrides (data, model, reward, scale), so a model
build never lands in a timed run.
--what build: `<tree>/bench/build_default.py` into a fresh temporary cache (build from scratch), with the same
model-related overrides. Read: the policy stage (tokenizer + SFT) and reward stage seconds, the reference's
validation perplexity and the reward model's held-out pairwise accuracy.

Prints, and writes atomically to <out>/phase_compare_<time>.md and .json (with every per-run number), a
Markdown table for docs/benchmarks.md: per row the median of each tree over its runs, and the median, min
and max of the per-pair ratios after/before (< 1: after is faster, for tokens/s > 1 is faster).
Fresh run directories, calibration caches and build caches are deleted after they are read (--keep: not).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's infalign, for the one writer below

from infalign.runtime.atomic import atomic_write_text  # noqa: E402

PHASES = ("generate", "score", "calibrate", "logprobs", "update")
TOKENS_COLUMN = "train/throughput/generated_tokens_per_s"
# Override keys that decide which models are built: they go to `infalign.models.build` / build_default.py too
MODEL_GROUPS = ("data", "model", "reward", "scale")

# (key of a run's measurements, row label); one table row each, in this order
TRAIN_ROWS = [
    *[(p, f"{p}, s / iteration") for p in PHASES],
    ("iteration_total", "**total, s / iteration**"),
    ("tokens_per_s", "rollout tokens/s (higher is faster)"),
    ("calibration_build_s", "calibration cache build, s"),
    ("run_wall_s", "run wall (subprocess), s"),
    ("run_reported_s", "run wall as the run reports it, s"),
    ("run_cpu_s", "run CPU (user + sys), s"),
]
BUILD_ROWS = [
    ("sft_s", "build: policy stage (tokenizer + SFT), s"),
    ("reward_s", "build: reward stage, s"),
    ("models_s", "build: both stages, s"),
    ("build_cpu_s", "build CPU (user + sys), s"),
    ("val_ppl", "reference validation perplexity"),
    ("reward_test_acc", "reward held-out pairwise accuracy"),
]


# ----------------------------------------------------------------------------------------------------------
# Reading one run's files (pure: no subprocess; the unit tests call these on synthetic files)
# ----------------------------------------------------------------------------------------------------------

def _number(text) -> float | None:
    return float(text) if text not in (None, "") else None


def _steady_median(values: list[float]) -> float | None:
    """Median without the first value (warm-up: lazy initialisation, first allocations), unless it is alone."""
    if not values:
        return None
    return statistics.median(values[1:] or values)


def iteration_stats(rows: list[dict]) -> dict:
    """Per-phase medians, the median per-iteration total and tokens/s from the rows of logs/metrics.csv.

    Rows without any phase timing (the evaluation rows) are skipped. The total is the median of the
    per-iteration sums (rows holding all phases); a trainer that logs the phases in separate rows gets the
    sum of the phase medians instead."""
    series: dict[str, list[float]] = {p: [] for p in PHASES}
    totals, tokens = [], []
    for row in rows:
        times = {p: _number(row.get(f"train/time/{p}")) for p in PHASES}
        if all(v is None for v in times.values()):
            continue
        for phase, value in times.items():
            if value is not None:
                series[phase].append(value)
        if None not in times.values():
            totals.append(sum(times.values()))
        if (tok := _number(row.get(TOKENS_COLUMN))) is not None:
            tokens.append(tok)
    stats = {p: _steady_median(series[p]) for p in PHASES}
    stats["iteration_total"] = _steady_median(totals) if totals else (
        sum(stats[p] for p in PHASES) if None not in stats.values() else None)
    stats["tokens_per_s"] = _steady_median(tokens)
    stats["iterations_logged"] = max(len(v) for v in series.values())
    stats["per_iteration"] = {**series, "tokens_per_s": tokens}
    return stats


def read_train_run(run_dir: Path) -> dict:
    """A finished training run's measurements: iteration_stats of logs/metrics.csv, the calibration cache's
    build time (its manifest, found through final_metrics.json) and the run's own wall time."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        stats = iteration_stats(list(csv.DictReader(f)))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    cache = Path(final["calibration_cache"])
    manifest = json.loads((cache / "manifest.json").read_text())
    # a cache hit would time the loading, not the build: say so rather than report it as a build time
    hit = bool(final.get("calibration_cache_hit"))
    stats.update(calibration_build_s=None if hit else manifest.get("build_seconds"), calibration_cache_hit=hit,
                 calibration_cache=str(cache), run_reported_s=final.get("wall_seconds"))
    return stats


def read_build_summary(summary: dict) -> dict:
    """The numbers of one bench/build_default.py JSON: stage seconds, validation perplexity, reward accuracy."""
    stages = summary.get("stages", {})
    policy, reward = stages.get("policy", {}), stages.get("reward", {})
    sft, rew = policy.get("seconds"), reward.get("seconds")
    return {"sft_s": sft, "reward_s": rew, "models_s": sft + rew if None not in (sft, rew) else None,
            "val_ppl": policy.get("meta", {}).get("val/ppl"), "reward_test_acc": reward.get("meta", {}).get("test_acc"),
            "sft_cache_hit": policy.get("cache_hit"), "reward_cache_hit": reward.get("cache_hit"),
            "build_wall_s": summary.get("wall_seconds"), "build_torch_threads": summary.get("torch_threads")}


def model_overrides(overrides: list[str]) -> list[str]:
    """The overrides that choose or size the models (data, model, reward, scale), which build.yaml shares."""
    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]
    return [o for o in overrides if key(o) in MODEL_GROUPS or key(o).split(".", 1)[0] in MODEL_GROUPS]


# ----------------------------------------------------------------------------------------------------------
# The comparison table (pure)
# ----------------------------------------------------------------------------------------------------------

def compare(pairs: list[dict], rows: list[tuple[str, str]]) -> list[dict]:
    """One entry per row with data: each tree's median over its runs and the after/before ratios taken
    within each pair (their median, min, max). A pair missing a value, or with 0 before, gives no ratio."""
    table = []
    for key, label in rows:
        before = [p["before"].get(key) for p in pairs]
        after = [p["after"].get(key) for p in pairs]
        if all(v is None for v in before + after):
            continue
        ratios = [a / b for b, a in zip(before, after) if a is not None and b]
        table.append({"key": key, "label": label,
                      "before": statistics.median([v for v in before if v is not None] or [None]),
                      "after": statistics.median([v for v in after if v is not None] or [None]),
                      "ratio": statistics.median(ratios) if ratios else None,
                      "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
                      "pairs": len(ratios)})
    return table


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:#.3g}"  # 3 significant digits, trailing zeros kept: 0.617, 5.50, 0.000350


def markdown_table(table: list[dict]) -> str:
    lines = ["| phase | before, median | after, median | after / before (median of pairs) | ratio min-max | pairs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in table:
        spread = f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}" if r["ratio"] is not None else "n/a"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "n/a"
        lines.append(f"| {r['label']} | {fmt(r['before'])} | {fmt(r['after'])} | {ratio} | {spread} | {r['pairs']} |")
    return "\n".join(lines)


def runs_table(runs: list[dict]) -> str:
    """Every run in the order it ran, with the load it met: to judge how noisy the medians are."""
    lines = ["| # | pair | tree | what | load at start | s / iteration | wall s | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(runs, 1):
        per_iter = fmt(r.get("iteration_total")) if r["what"] == "train" else ""
        lines.append(f"| {i} | {r['pair']} | {r['tree']} | {r['what']} | {r['loadavg_start'][0]:.1f} | {per_iter} | "
                     f"{fmt(r['wall_s'])} | {fmt(r['cpu_s'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running the trees
# ----------------------------------------------------------------------------------------------------------

def tree_env(root: Path, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "INFALIGN_CONF_DIR": str(root / "conf"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}
    env.pop("INFALIGN_CACHE", None)  # cache_root is passed explicitly; never a cache shared by accident
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


CHECK_SCRIPT = """
import json, infalign, torch
from infalign.runtime.paths import conf_dir
print(json.dumps({"infalign": infalign.__file__, "conf": conf_dir(), "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads()}))
"""


def check_tree(label: str, root: Path, env: dict) -> dict:
    """Fail unless `import infalign` under this env loads <root>/src (an editable install elsewhere would
    otherwise win silently and both columns would time the same code)."""
    if not ((root / "train.py").is_file() and (root / "src" / "infalign").is_dir()):
        sys.exit(f"phase_compare: {label} tree {root} is not an infalign checkout (no train.py and src/infalign/)")
    out = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"phase_compare: {label} tree {root}: cannot import infalign with PYTHONPATH={env['PYTHONPATH']}:\n"
                 f"{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    for what, home in (("infalign", root / "src"), ("conf", root)):
        if not Path(info[what]).resolve().is_relative_to(home.resolve()):
            sys.exit(f"phase_compare: {label} tree {root}: {what} resolves to {info[what]}, outside {home}")
    return info


def revision(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float]:
    """Run cmd (output to log); returns (wall seconds, CPU seconds of the process tree). Exits on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        sys.exit(f"phase_compare: failed ({code}): {shlex.join(cmd)}\n--- last lines of {log}:\n{log.read_text()[-4000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prebuild(tree: dict, overrides: list[str], work: Path) -> float:
    """Load (or build, if missing) the tree's models once, untimed in the table: no timed run builds them."""
    run_dir = work / f"prebuild-{tree['label']}"
    cmd = [sys.executable, "-m", "infalign.models.build", f"cache_root={tree['cache']}", "progress=false",
           f"hydra.run.dir={run_dir}", *model_overrides(overrides)]
    wall, _ = timed(cmd, tree["root"], tree["env"], work / f"prebuild-{tree['label']}.log")
    return wall


def run_train(tree: dict, args, calib_seed: int, work: Path, tag: str) -> dict:
    run_dir = work / f"train-{tag}"
    cmd = [sys.executable, str(tree["root"] / "train.py"), "logger=none", "progress=false", "eval.every=0",
           f"rl.iterations={args.iterations}", f"calibration.seed={calib_seed}", f"hydra.run.dir={run_dir}",
           f"cache_root={tree['cache']}", *args.overrides]
    wall, cpu = timed(cmd, tree["root"], tree["env"], work / f"train-{tag}.log")
    stats = read_train_run(run_dir)
    stats.update(run_wall_s=wall, run_cpu_s=cpu, calibration_seed=calib_seed)
    if not args.keep:  # a fresh key: nothing else will read this calibration cache again
        cache = Path(stats["calibration_cache"])
        if not stats["calibration_cache_hit"] and cache.resolve().is_relative_to(Path(tree["cache"]).resolve()):
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return stats


def run_build(tree: dict, args, work: Path, tag: str) -> dict:
    cache, out = work / f"build-{tag}-cache", work / f"build-{tag}-out"
    cmd = [sys.executable, str(tree["root"] / "bench" / "build_default.py"), "--cache", str(cache), "--samples", "0",
           "--out", str(out), *model_overrides(args.overrides)]
    wall, cpu = timed(cmd, tree["root"], tree["env"], work / f"build-{tag}.log")
    (summary,) = out.glob("build_*.json")  # a fresh --out per run: exactly one
    stats = read_build_summary(json.loads(summary.read_text()))
    stats.update(build_cpu_s=cpu, build_process_wall_s=wall)
    if not args.keep:
        shutil.rmtree(cache, ignore_errors=True)
    return stats


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both trees' train.py (e.g. scale=smoke)")
    ap.add_argument("--before", required=True, type=Path, help="the old checkout")
    ap.add_argument("--after", default=REPO, type=Path, help="the new checkout (default: this one)")
    ap.add_argument("--pairs", type=int, default=2, help="runs per tree (one before + one after each)")
    ap.add_argument("--iterations", type=int, default=8, help="rl.iterations of every training run")
    ap.add_argument("--what", default="train", help="comma-separated: train, build")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run (default: torch's)")
    ap.add_argument("--out", default="outputs/bench", type=Path)
    ap.add_argument("--before-cache", type=Path, help="cache_root of the before runs (default <before>/.cache)")
    ap.add_argument("--after-cache", type=Path, help="cache_root of the after runs (default <after>/.cache)")
    ap.add_argument("--no-prebuild", action="store_true", help="do not load/build each tree's models before timing")
    ap.add_argument("--keep", action="store_true", help="keep run directories, calibration caches and build caches")
    args = ap.parse_args(argv)
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not args.what or set(args.what) - {"train", "build"}:
        ap.error(f"--what takes train and/or build, not {','.join(args.what)}")
    if args.pairs < 1 or args.iterations < 1:
        ap.error("--pairs and --iterations must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, started = os.getloadavg(), datetime.datetime.now().astimezone()
    trees = {}
    for label, root, cache in (("before", args.before, args.before_cache), ("after", args.after, args.after_cache)):
        root = root.resolve()
        env = tree_env(root, args.threads)
        trees[label] = {"label": label, "root": root, "cache": (cache or root / ".cache").resolve(), "env": env,
                        "revision": revision(root), "check": check_tree(label, root, env)}
        print(f"{label}: {root} ({trees[label]['revision']}), infalign from {trees[label]['check']['infalign']}, "
              f"torch {trees[label]['check']['torch']} with {trees[label]['check']['torch_threads']} threads",
              file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="infalign-phase-compare-"))
    prebuild_s = {}
    if "train" in args.what and not args.no_prebuild:
        for label, tree in trees.items():
            prebuild_s[label] = prebuild(tree, args.overrides, work)
            print(f"{label}: models ready in {prebuild_s[label]:.1f} s", file=sys.stderr, flush=True)

    # A B A B: one run of each tree per pair, back to back. A new calibration seed per pair: a key no cache
    # holds, so every run builds (and times) its calibration cache; the two trees of a pair share the seed,
    # so they sample the same prompts with the same random streams (the same work, if the code agrees)
    seed0 = int(time.time()) % 1_000_000 * 1000
    pairs, runs = [], []
    for i in range(args.pairs):
        pair = {"before": {}, "after": {}}
        for what in args.what:
            for label, tree in trees.items():
                tag = f"{i + 1}-{label}"
                record = {"pair": i + 1, "tree": label, "what": what, "loadavg_start": os.getloadavg()}
                if what == "train":
                    # both trees on one cache root: the after run must not hit the cache the before run built
                    shared = label == "after" and tree["cache"] == trees["before"]["cache"]
                    stats = run_train(tree, args, seed0 + 2 * i + shared, work, tag)
                    record.update(stats, wall_s=stats["run_wall_s"], cpu_s=stats["run_cpu_s"])
                else:
                    stats = run_build(tree, args, work, tag)
                    record.update(stats, wall_s=stats["build_process_wall_s"], cpu_s=stats["build_cpu_s"])
                pair[label].update(stats)
                runs.append(record)
                print(f"pair {i + 1}/{args.pairs} {label} {what}: {record['wall_s']:.1f} s wall "
                      f"(load {record['loadavg_start'][0]:.1f} at start)", file=sys.stderr, flush=True)
        pairs.append(pair)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    rows = (TRAIN_ROWS if "train" in args.what else []) + (BUILD_ROWS if "build" in args.what else [])
    table = compare(pairs, rows)
    load_after = os.getloadavg()
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    threads = ", ".join(f"{t['label']} {t['check']['torch_threads']}" for t in trees.values())
    lines = [
        f"### `{command}`", "",
        f"{started:%Y-%m-%d %H:%M %Z}; {cpu_model()}, {os.cpu_count()} cores; torch threads: {threads}"
        f"{f' (OMP_NUM_THREADS={args.threads})' if args.threads else ''}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} before, {'/'.join(f'{x:.1f}' for x in load_after)} after.",
        f"before: `{trees['before']['root']}` ({trees['before']['revision']}); "
        f"after: `{trees['after']['root']}` ({trees['after']['revision']}).",
        f"{args.pairs} pair(s), each one run of before then one of after; overrides "
        f"`{' '.join(args.overrides) or '(none)'}` (models: `{' '.join(model_overrides(args.overrides)) or '(none)'}`); "
        "ratios after / before taken within each pair." + (
            f" Training runs: rl.iterations={args.iterations}, per run the median over iterations 2-{args.iterations}; "
            "model loading and the final evaluation are not timed apart (the trainer logs no time for them): "
            "they are inside the run walls." if "train" in args.what else ""), "",
        markdown_table(table), "", runs_table(runs), "",
    ]
    report = "\n".join(lines)
    print("\n" + report)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"phase_compare_{started:%Y%m%d-%H%M%S}"
    raw = {"command": command, "date": started.isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
           "threads_env": args.threads, "iterations": args.iterations, "overrides": args.overrides,
           "model_overrides": model_overrides(args.overrides), "what": args.what, "prebuild_seconds": prebuild_s,
           "trees": {k: {"root": str(t["root"]), "cache": str(t["cache"]), "revision": t["revision"], **t["check"]}
                     for k, t in trees.items()},
           "table": table, "runs": runs}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(raw, indent=1, default=str))
    atomic_write_text(stem.with_suffix(".md"), report)
    print(f"written: {stem}.md, {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
