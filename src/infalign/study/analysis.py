"""A sweep's runs as a study: gaps to theory and KL efficiency per run, mean ± SE over seeds per solver x method
x beta, win rates at matched KL, paired per-prompt comparisons between methods.

Every number comes from the members' `final_metrics.json` and `eval_per_prompt.csv` (read by
`infalign.study.runs`; measured on the same held-out prompts against the same cached reference samples) and
from `infalign.theory` evaluated at each run's measured KL:

- theory for the run's transform: the beta at which the optimal tilt of that transform, seen through the
  M-sample calibration its target was built with (`yardstick_m`: `calibration.m` for RL, the pool's `distill.m` - 1
  for distillation, whose pool samples are calibrated leave-one-out; the exact fixed-cache form,
  infalign.theory.finite_m), spends the measured KL
  (`beta_for_kl`), then that policy's win rates. It is what the transform would give if RL reached its
  optimum; `raw` has no such value (its reward is uncalibrated, so no model-agnostic theory);
- the optimum: the best any policy can do at that KL (the fixed-point optimal transform for best-/worst-of-N,
  traced over beta; for the standard win rate the identity transform, which is optimal for N = 1);
- KL efficiency (infalign.theory.efficiency) on the run's target metric (bon / won / std): the gain fraction
  (the run's gain over 0.5 per the curve's gain at the same KL) and the KL efficiency (the KL the curve needs for
  the run's win rate per KL spent), against the tilt and against the optimum; and the gain fraction against the
  same tilt on every metric (`gain_fraction_<std|bon|won>`, issue 30 item 1), held-in beside held-out when the run
  recorded a held-in evaluation (`eval_held_in/*`: `gain_fraction_<metric>_held_in`, NaN otherwise);
- the claimed orderings at matched KL with the shape transfer (infalign.study.orderings, orderings.csv).

`gap = measured - theoretical`: negative when the run falls short of the closed form.
Matched-KL values are interpolated only inside the KL range each method measured, never extrapolated or
interpolated towards the reference.
numpy/scipy and infalign.theory only: no Lightning, no training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infalign.study.orderings import ordering_rows
from infalign.study.paired import curve_label, paired_comparisons, predicted_difference
from infalign.study.run_config import calibration_m, run_solver, transform_from_run, yardstick_m
from infalign.study.runs import collect_runs, logged_values
from infalign.study.seed_means import aggregate, efficiency_rows
from infalign.study.tilt_fit import read_tilt_fit
from infalign.theory import default_grid
from infalign.theory.efficiency import (  # the optimum lives in theory (the trainer uses it too); re-exported here
    BETA_START,
    BETA_STOP,
    GRID_CELLS,
    KL_FLOOR,
    PER_DECADE,
    optimum_at,
    optimum_curve,
    target_metric,
    tilt_at_kl,
)
from infalign.theory.run_efficiency import efficiency_columns

__all__ = ["BETA_START", "BETA_STOP", "PER_DECADE", "Study", "analyze_sweep", "matched_kl", "metric_column",
           "optimum_curve", "optimum_at", "paired_comparisons", "predicted_difference", "run_rows", "theory_at_kl"]

RAW_NOTE = "raw reward: uncalibrated, no closed-form theory for its transform (gap to the optimum only)"
MAXK_NOTE = "maxk: optimises the win rate itself, no transform and so no tilt (gap to the optimum only)"


def _grid():
    return default_grid(GRID_CELLS)


# ---------------------------------------------------------------------------------------------- theory
def theory_at_kl(transform, kl: float, n: int, m: int | None = None) -> dict:
    """Win rates of the optimal tilt of `transform` (through an `m`-sample calibration; None: continuous) that
    spends `kl` nats: {beta, std, bon, won} (`infalign.theory.efficiency.tilt_at_kl` on the study's grid)."""
    return tilt_at_kl(transform, kl, n, m, _grid())


def metric_column(metric: str, n: int) -> str:
    """The study-row column of `metric` at N = `n` (std, bon@N, won@N)."""
    return "std" if metric == "std" else f"{metric}@{n}"


# ---------------------------------------------------------------------------------------------- runs
def response_lengths(member_dir: Path, last: int = 3) -> tuple[float, float]:
    """Mean training-rollout response length (tokens) at the first iteration (the policy is still the
    reference) and over the last `last` iterations, from the run's logs/metrics.csv (NaN if absent): a
    policy that wins by writing shorter or longer answers shows here (reward-model exploitation)."""
    lengths = logged_values(member_dir, "train/policy/response_length")
    if not lengths:
        return math.nan, math.nan
    return lengths[0], float(np.mean(lengths[-last:]))


def _ns_of(row: dict) -> list[int]:
    return sorted(int(k.split("@")[1]) for k in row if k.startswith("eval/bon_win_rate@") and not k.endswith("_se"))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def run_rows(raw_rows: list[dict], sweep_dir: Path, kl_max: float | None = None) -> list[dict]:
    """One flat row per finished run: identity columns, measured win rates, theory, optimum, gaps, efficiency."""
    if kl_max is None:
        kl_max = max([float(r.get("eval/kl", 0.0)) for r in raw_rows] + [0.0])
    for n in {int(r["n"]) for r in raw_rows}:  # trace each optimum once, far enough for every run
        for key in ("std", "bon", "won"):
            optimum_curve(n, key, kl_max)
    out = []
    for r in raw_rows:
        n = int(r["n"])
        member_dir = Path(sweep_dir) / r["member"]
        solver = run_solver(r, member_dir)
        m = yardstick_m(r, member_dir, solver)  # the M its target was calibrated with (distill: the pool's M - 1)
        row = {"member": r["member"], "solver": solver, "method": r.get("method") or r.get("transform"),
               "transform": r.get("transform"), "n": n, "beta": float(r["beta"]), "t": r.get("t"),
               "seed": int(r.get("seed", 0)), "m": m, "calibration_m": calibration_m(r, member_dir),
               "kl": float(r["eval/kl"]), "kl_calibrated": _number(r.get("eval/kl_calibrated"))}
        row["length_start"], row["length_end"] = response_lengths(member_dir)
        row["std"], row["std_pse"] = r.get("eval/bon_win_rate@1", math.nan), r.get("eval/bon_win_rate@1_se", math.nan)
        for big_n in _ns_of(r):  # `_pse`: the within-run standard error over prompts
            for mode in ("bon", "won"):
                row[f"{mode}@{big_n}"] = r[f"eval/{mode}_win_rate@{big_n}"]
                row[f"{mode}@{big_n}_pse"] = r[f"eval/{mode}_win_rate@{big_n}_se"]
        measured = {"std": row["std"], "bon": row.get(f"bon@{n}", math.nan), "won": row.get(f"won@{n}", math.nan)}
        notes = []
        if row["kl"] <= KL_FLOOR:
            notes.append("measured KL <= 0 (sampling noise): theory and optimum are the reference's 0.5")
        theory = {"beta": math.nan, "std": math.nan, "bon": math.nan, "won": math.nan}
        # rebuilt as data (infalign.study.run_config: allow-listed transforms, the recorded t, never executed)
        transform = transform_from_run(r, member_dir)
        if transform is None:
            notes.append(MAXK_NOTE if solver == "maxk" else RAW_NOTE)
        else:
            try:
                theory = theory_at_kl(transform, row["kl"], n, m)
            except ValueError as e:  # e.g. won_exp with a large t cannot reach the measured KL
                notes.append(f"theory n/a: {e}")
        row["theory_beta"] = theory["beta"]
        for key in ("std", "bon", "won"):
            opt = optimum_at(n, key, row["kl"]) if row["kl"] > KL_FLOOR else 0.5
            row[f"theory_{key}"], row[f"opt_{key}"] = theory[key], opt
            row[f"gap_theory_{key}"] = measured[key] - theory[key]
            row[f"gap_opt_{key}"] = measured[key] - opt
        for key in ("std", "bon", "won"):  # per metric: the share of the same tilt's gain on that metric
            row[f"gain_fraction_{key}"] = _gain_fraction(measured[key], theory[key])
        row.update(_held_in(r, transform, n, m, notes))
        fit = read_tilt_fit(member_dir)  # `python -m infalign.study.tilt_fit <member>` (issue 30 item 3); NaN before
        row["tilt_slope"], row["tilt_shape"] = _number(fit.get("slope")), _number(fit.get("shape"))
        try:  # KL efficiency on the run's target metric (infalign.theory.efficiency)
            metric = target_metric(row["method"], r.get("transform"), r.get("metric") if solver == "maxk" else None)
            eff = efficiency_columns(transform, row["kl"], measured[metric], n, metric, m)
            if eff["efficiency_note"] and transform is not None:
                notes.append(eff["efficiency_note"])
        except ValueError as e:
            metric, eff = None, {}
            notes.append(f"efficiency n/a: {e}")
        row["metric"] = metric
        for key in ("win_rate", "tilt_win_rate_at_kl", "optimum_win_rate_at_kl", "gain_fraction", "kl_efficiency",
                    "gain_fraction_optimum", "kl_efficiency_optimum"):
            row[key] = eff.get(key, math.nan)
        row["note"] = "; ".join(dict.fromkeys(notes))
        out.append(row)
    return out


def _gain_fraction(win: float, tilt: float) -> float:
    """(win - 0.5) / (tilt - 0.5) on one metric: the run's gain over the reference as a share of the gain of
    its tilt (at the run's KL and yardstick M) on the same metric; NaN without a tilt or with no gain to share."""
    gain = tilt - 0.5
    return (win - 0.5) / gain if math.isfinite(win) and math.isfinite(gain) and gain > 1e-12 else math.nan


HELD_IN = "eval_held_in"  # the held-in evaluation's keys in final_metrics.json (training prompts)


def _held_in(r: dict, transform, n: int, m: int | None, notes: list[str]) -> dict:
    """kl_held_in, <metric>_held_in and gain_fraction_<metric>_held_in from the run's `eval_held_in/*` final
    metrics (the same evaluation on training prompts), the tilt evaluated at the held-in KL; NaN when the run has
    no held-in evaluation."""
    kl = _number(r.get(f"{HELD_IN}/kl"))
    measured = {"std": _number(r.get(f"{HELD_IN}/bon_win_rate@1")), "bon": _number(r.get(f"{HELD_IN}/bon_win_rate@{n}")),
                "won": _number(r.get(f"{HELD_IN}/won_win_rate@{n}"))}
    out = {"kl_held_in": kl, "kl_calibrated_held_in": _number(r.get(f"{HELD_IN}/kl_calibrated")),
           **{f"{k}_held_in": v for k, v in measured.items()}}
    theory = {"std": math.nan, "bon": math.nan, "won": math.nan}
    if transform is not None and math.isfinite(kl):
        try:
            theory = theory_at_kl(transform, kl, n, m)
        except ValueError as e:
            notes.append(f"held-in theory n/a: {e}")
    for key in ("std", "bon", "won"):
        out[f"gain_fraction_{key}_held_in"] = _gain_fraction(measured[key], theory[key])
    return out


# ---------------------------------------------------------------------------------------------- matched KL
def _auto_kls(curves: dict[str, np.ndarray], points: int) -> list[float]:
    """`points` KL values over the range of measured KL that every method's curve covers (geometric when it
    is positive); empty when the measured ranges do not overlap: nothing is then compared."""
    lo = max(float(k.min()) for k in curves.values())
    hi = min(float(k.max()) for k in curves.values())
    if hi > lo:
        spread = np.geomspace(lo, hi, points) if lo > 0 else np.linspace(lo, hi, points)
        return [float(x) for x in spread]
    if hi == lo:
        return [hi]
    return []


def matched_kl(groups: list[dict], kls=None, points: int = 3) -> list[dict]:
    """Win rates of every method at common KL values, interpolated linearly along its mean curve (KL sorted).

    `kls`: the KL values, or None for `points` values over the range all methods measured. Only inside each
    method's measured KL range: beyond its largest or below its smallest measured KL a method gets NaN. The
    reference (KL 0, win rate 0.5) is not a measured point: the chord from it to a method's first point is a
    lower bound for a concave curve, drawn dotted in the figures but never reported as a result. The SE is
    interpolated the same way (an approximation: neighbouring points are independent runs).
    """
    out = []
    for n in sorted({g["n"] for g in groups}):
        curves = {}
        for label in dict.fromkeys(curve_label(g) for g in groups if g["n"] == n):
            pts = sorted((g for g in groups if g["n"] == n and curve_label(g) == label and math.isfinite(g["kl"])),
                         key=lambda g: g["kl"])
            if pts:
                curves[label] = pts
        if kls:
            targets = [float(k) for k in kls]
        else:
            targets = _auto_kls({m: np.array([p["kl"] for p in pts]) for m, pts in curves.items()}, points) if curves else []
        for kl in targets:
            for label, pts in curves.items():
                x = np.array([p["kl"] for p in pts])
                row = {"n": n, "kl": kl, "method": label}
                inside = x[0] - 1e-12 <= kl <= x[-1] + 1e-12
                for key in ("std", "bon", "won"):
                    col = metric_column(key, n)
                    for suffix in ("", "_se"):
                        y = np.array([p.get(col + suffix, math.nan) for p in pts], dtype=float)
                        row[key + suffix] = float(np.interp(kl, x, y)) if inside else math.nan
                    row[f"opt_{key}"] = optimum_at(n, key, kl)
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- all
@dataclass
class Study:
    sweep_dir: Path
    runs: list[dict]  # one per finished run (run_rows)
    groups: list[dict]  # per solver x method x n x beta, mean and SE over seeds (aggregate)
    matched: list[dict]  # win rates at common KL values (matched_kl)
    ns: list[int] = field(default_factory=list)  # every N with measured win rates
    methods: list[str] = field(default_factory=list)  # in sweep order
    efficiency: list[dict] = field(default_factory=list)  # solver_efficiency.csv (efficiency_rows)
    paired: list[dict] = field(default_factory=list)  # per-prompt paired comparisons (paired_comparisons)
    orderings: list[dict] = field(default_factory=list)  # the claimed orderings at matched KL (orderings.ordering_rows)

    @property
    def kl_max(self) -> float:
        return max([r["kl"] for r in self.runs] + [0.0])


def analyze_sweep(sweep_dir, kls=None, points: int = 3) -> Study:
    """Read every finished member of `sweep_dir` and compute the study (see the module docstring)."""
    sweep_dir = Path(sweep_dir)
    raw = [r for r in collect_runs(sweep_dir) if "eval/kl" in r]
    if not raw:
        raise FileNotFoundError(f"{sweep_dir} has no finished run the study can read (<member>/final_metrics.json "
                                "with the final win rates; a damaged member is named in a warning and skipped)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean over all-NaN theory columns of raw
        runs = run_rows(raw, sweep_dir)
        groups = aggregate(runs)
        matched = matched_kl(groups, kls, points)
        paired = paired_comparisons(groups, sweep_dir)
        orderings = ordering_rows(runs, sweep_dir)
    ns = sorted({n for r in raw for n in _ns_of(r)})
    return Study(sweep_dir, runs, groups, matched, ns, list(dict.fromkeys(r["method"] for r in runs)),
                 efficiency_rows(groups), paired, orderings)
