"""A sweep's runs as a study: per run its theory, optimum, gaps and KL efficiency; mean ± s.e. over seeds per
solver x method x beta; win rates at matched KL; paired per-prompt comparisons; the claimed orderings.

Every number comes from the members' files (`infalign.study.runs`) and from `infalign.theory` at each run's
measured KL. *Theory* is the optimal tilt of the run's own transform, seen through the M-sample calibration its
target was built with (`yardstick_m`: `calibration.m` for RL, the pool's `distill.m` - 1 for distillation), that
spends the measured KL: what the transform gives if RL reached its optimum (`raw` has none: its reward is
uncalibrated). The *optimum* is the best any policy reaches at that KL. `gap = measured - theoretical`: negative
when the run falls short. Matched-KL values are interpolated only inside each method's measured KL range.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infalign.study.orderings import metric_column, ordering_rows
from infalign.study.paired import curves_at, paired_comparisons, predicted_difference
from infalign.study.run_config import calibration_m, run_solver, transform_from_run, yardstick_m
from infalign.study.runs import collect_runs, logged_values
from infalign.study.seed_means import aggregate, efficiency_rows
from infalign.study.tilt_fit import read_tilt_fit
from infalign.theory.efficiency import KL_FLOOR, optimum_at, optimum_curve, target_metric, tilt_at_kl
from infalign.theory.run_efficiency import efficiency_columns, gain_fraction

# the study's names for what it re-exports: the optimal tilt of a transform at a KL, on the study's grid
theory_at_kl = tilt_at_kl
__all__ = ["Study", "analyze_sweep", "matched_kl", "metric_column", "optimum_curve", "optimum_at",
           "paired_comparisons", "predicted_difference", "run_rows", "theory_at_kl"]

RAW_NOTE = "raw reward: uncalibrated, no closed-form theory for its transform (gap to the optimum only)"
MAXK_NOTE = "maxk: optimises the win rate itself, no transform and so no tilt (gap to the optimum only)"


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


NO_TILT = {"beta": math.nan, "std": math.nan, "bon": math.nan, "won": math.nan}


def _tilt(transform, kl: float, n: int, m: int | None, notes: list[str], what: str) -> dict:
    """The optimal tilt of the run's transform spending `kl` ({beta, std, bon, won}); NaN, with a note, where it
    cannot (e.g. won_exp with a large t cannot reach the measured KL)."""
    try:
        return tilt_at_kl(transform, kl, n, m)
    except ValueError as e:
        notes.append(f"{what} n/a: {e}")
        return NO_TILT


def run_rows(raw_rows: list[dict], sweep_dir: Path) -> list[dict]:
    """One flat row per finished run: identity columns, measured win rates, theory, optimum, gaps, efficiency."""
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
        # rebuilt as data (infalign.study.run_config: allow-listed transforms, the recorded t, never executed)
        transform = transform_from_run(r, member_dir)
        if transform is None:
            notes.append(MAXK_NOTE if solver == "maxk" else RAW_NOTE)
        theory = NO_TILT if transform is None else _tilt(transform, row["kl"], n, m, notes, "theory")
        row["theory_beta"] = theory["beta"]
        for key in ("std", "bon", "won"):
            opt = optimum_at(n, key, row["kl"]) if row["kl"] > KL_FLOOR else 0.5
            row[f"theory_{key}"], row[f"opt_{key}"] = theory[key], opt
            row[f"gap_theory_{key}"] = measured[key] - theory[key]
            row[f"gap_opt_{key}"] = measured[key] - opt
        for key in ("std", "bon", "won"):  # per metric: the share of the same tilt's gain on that metric
            row[f"gain_fraction_{key}"] = gain_fraction(measured[key], theory[key])
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
    has_tilt = transform is not None and math.isfinite(kl)
    theory = _tilt(transform, kl, n, m, notes, "held-in theory") if has_tilt else NO_TILT
    for key in ("std", "bon", "won"):
        out[f"gain_fraction_{key}_held_in"] = gain_fraction(measured[key], theory[key])
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
    """Win rates of every method at common KL values (`kls`, else `points` over the range all methods measured),
    interpolated linearly along its mean curve, only inside the method's measured KL range (NaN beyond it; the
    reference is no measured point). The s.e. is interpolated likewise (neighbouring points are independent runs).
    """
    out = []
    for n in sorted({g["n"] for g in groups}):
        curves = curves_at(groups, n)
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
