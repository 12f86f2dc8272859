"""How KL-efficient each solver is: gain fraction and KL efficiency against the solver's knobs, at two betas.

Every variant (a named list of overrides: a solver preset and its knobs) is trained for each method x beta x
seed with the project's own `python train.py`, one process after another, and the table is built from the
runs' final_metrics.json (`gain_fraction`, `kl_efficiency`, `optimum_win_rate_at_kl`, written by
`infalign.trainer.run` with `infalign.theory.efficiency`) and logs/metrics.csv (gradient noise scale,
distillation's effective sample size). A member whose final_metrics.json exists is not run again, so the
sweep can be stopped and continued (`resume=auto`).

    python bench/solver_sweep.py                                   # the variants below, 2 betas per method
    python bench/solver_sweep.py --variants rloo,distill --seeds 0,1
    python bench/solver_sweep.py --variant "lr3e-5=solver=exact optimizer.lr=3e-5" --variants lr3e-5
    python bench/solver_sweep.py --report-only                     # tables from the runs there are

Output: <out>/solver_sweep.md and .csv, and with --doc / --csv the same written to docs/ (atomically).
Columns: `gain_fraction` and `kl_efficiency` are against the optimal tilt of the run's own transform
(`tilt_win_rate_at_kl`: its win rate at the run's KL, exact fixed-cache form for M = 16); the optimum any
policy reaches at that KL is `optimum_win_rate_at_kl`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from infalign.runtime.atomic import atomic_write_text  # noqa: E402

# name -> overrides. The knobs each solver preset sets are in conf/solver/; these vary them.
VARIANTS = {
    "rloo": ["solver=rloo"],
    "exact": ["solver=exact"],
    "distill": ["solver=distill"],
    "distill_rl": ["solver=distill_rl"],
}
# method -> two betas: in theory (closed forms, M = 16) about 0.3 and 1 nat for the method's own transform
POINTS = {"bon_exp": [0.4, 0.24], "calibrated": [0.24, 0.1]}


def member_dir(out: Path, variant: str, method: str, beta: float, seed: int) -> Path:
    return out / variant / method / f"beta{beta:g}" / f"seed{seed}"


def run_member(out: Path, variant: str, overrides: list[str], method: str, beta: float, seed: int,
               extra: list[str]) -> float | None:
    d = member_dir(out, variant, method, beta, seed)
    if (d / "final_metrics.json").exists():
        return None
    d.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), f"method={method}", f"beta={beta}", f"seed={seed}", *overrides,
           *extra, "logger=none", "progress=false", "resume=auto", f"hydra.run.dir={d}"]
    start = time.time()
    with open(d.parent / f"seed{seed}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {d.parent / f'seed{seed}.log'}")
    return time.time() - start


def recompute_efficiency(final: dict, d: Path) -> dict:
    """Gain fraction and KL efficiency from the run's measured KL and win rate with the current theory
    (`infalign.theory.efficiency`), so runs recorded by an older version are judged by the same yardstick."""
    from infalign.study.run_config import transform_from_run
    from infalign.theory.efficiency import measured_win_rate, target_metric
    from infalign.theory.run_efficiency import efficiency_columns

    metric = target_metric(final.get("method"), None, final.get("metric"))
    n = int(final["n"])
    cols = efficiency_columns(transform_from_run(final, d), float(final["eval/kl"]),
                              measured_win_rate(final, metric, n), n, metric, final.get("calibration_m", 16))
    return {k: (math.nan if v is None else v) for k, v in cols.items()}


def _logged(d: Path, column: str) -> list[float]:
    path = d / "logs" / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column) not in (None, "")]


def _mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def collect(out: Path, variants: list[str], points: dict[str, list[float]], seeds: list[int]) -> list[dict]:
    rows = []
    for variant in variants:
        for method, betas in points.items():
            for beta in betas:
                finals, extras = [], []
                for seed in seeds:
                    d = member_dir(out, variant, method, beta, seed)
                    if (d / "final_metrics.json").exists():
                        final = json.loads((d / "final_metrics.json").read_text())
                        finals.append({**final, **recompute_efficiency(final, d)})
                        noise = _logged(d, "train/grad/noise_scale")
                        ess = _logged(d, "train/distill/ess")
                        extras.append({"noise": noise[-1] if noise else math.nan,
                                       "ess": statistics.fmean(ess) if ess else math.nan})
                if not finals:
                    continue
                metric = finals[0].get("metric")
                key = {"bon": f"eval/bon_win_rate@{finals[0]['n']}", "won": f"eval/won_win_rate@{finals[0]['n']}",
                       "std": "eval/bon_win_rate@1"}.get(metric, "eval/bon_win_rate@1")
                row = {"solver": variant, "method": method, "beta": beta, "seeds": len(finals), "metric": metric}
                for name, values in (("kl", [f["eval/kl"] for f in finals]),
                                     ("kl_calibrated", [f.get("kl_calibrated", math.nan) for f in finals]),
                                     ("win_rate", [f[key] for f in finals]),
                                     ("tilt_win_rate_at_kl", [f.get("tilt_win_rate_at_kl", math.nan) for f in finals]),
                                     ("optimum_win_rate_at_kl", [f.get("optimum_win_rate_at_kl", math.nan) for f in finals]),
                                     ("gain_fraction", [f.get("gain_fraction", math.nan) for f in finals]),
                                     ("kl_efficiency", [f.get("kl_efficiency", math.nan) for f in finals]),
                                     ("grad_noise_scale", [e["noise"] for e in extras]),
                                     ("distill_ess", [e["ess"] for e in extras]),
                                     ("wall_s", [f.get("wall_seconds", math.nan) for f in finals])):
                    row[name], row[f"{name}_se"] = _mean_se(values)
                rows.append(row)
    return rows


COLUMNS = ["solver", "method", "beta", "seeds", "kl", "kl_calibrated", "metric", "win_rate", "tilt_win_rate_at_kl",
           "optimum_win_rate_at_kl",
           "gain_fraction", "kl_efficiency", "grad_noise_scale", "distill_ess", "wall_s"]


def _fmt(row: dict, key: str) -> str:
    v = row[key]
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    se = row.get(f"{key}_se")
    digits = 0 if key in ("wall_s", "grad_noise_scale") else 3
    text = f"{v:.{digits}f}" if key != "beta" else f"{v:g}"
    if se is not None and isinstance(se, float) and math.isfinite(se) and key not in ("beta", "seeds", "wall_s"):
        text += f" ± {se:.{digits}f}"
    return text


def markdown(rows: list[dict], command: str, variants: dict[str, list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r, c) for c in COLUMNS) + " |" for r in rows]
    spec = "\n".join(f"- `{name}`: `{' '.join(v)}`" for name, v in variants.items())
    return f"`{command}`\n\nVariants:\n{spec}\n\n" + "\n".join(lines) + "\n"


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = [c for c in COLUMNS] + [f"{c}_se" for c in ("kl", "win_rate", "gain_fraction", "kl_efficiency")]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "solver_sweep"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", action="append", default=[], help='"name=override override ..." (repeatable)')
    ap.add_argument("--points", default=None, help='e.g. "bon_exp:0.4,0.24;calibrated:0.24,0.1"')
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--doc", default=None, help="also write the table to this markdown file (e.g. docs/solver_sweep.md)")
    ap.add_argument("--csv", default=None, help="also write the CSV here (e.g. docs/solver_efficiency.csv)")
    ap.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    args = ap.parse_args(argv)
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name.strip()] = overrides.split()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {sorted(variants)} (add one with --variant name=overrides)")
    points = POINTS
    if args.points:
        points = {m: [float(b) for b in bs.split(",")] for m, bs in (p.split(":") for p in args.points.split(";"))}
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if not args.report_only:
        for variant in chosen:
            for method, betas in points.items():
                for beta in betas:
                    for seed in seeds:
                        took = run_member(out, variant, variants[variant], method, beta, seed, args.extra)
                        if took is not None:
                            print(f"{variant} {method} beta={beta:g} seed={seed}: {took:.0f} s "
                                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    rows = collect(out, chosen, points, seeds)
    command = "python bench/solver_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, command.strip(), {v: variants[v] for v in chosen})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "solver_sweep.md", text)
    atomic_write_text(out / "solver_sweep.csv", write_csv(rows))
    if args.doc:
        atomic_write_text(Path(args.doc), text)
    if args.csv:
        atomic_write_text(Path(args.csv), write_csv(rows))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
