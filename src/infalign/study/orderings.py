"""The three orderings the paper claims, each two methods compared at matched KL (a study's `orderings.csv`;
issue 30, item 1): bon_exp > calibrated on best-of-N, won_exp > calibrated on worst-of-N, calibrated >= raw on the
standard win rate; and (issue 31) the maxk solver against bon_exp and calibrated trained by another solver.

Two methods' runs rarely spend the same KL, and the win rate rises with KL, so each method's metric is regressed
on KL across its seeds (OLS) and both fits are read at one common KL, the mean of the two sides' mean KLs; the s.e.
comes from each fit's prediction variance (the sides are independent). Matched twice: on the KL in calibrated space
(the KL the reward can see) and on the sequence KL. NaN where a side has fewer than 3 runs or a single KL.

`shape_transfer` = (A - B) / (tilt A - tilt B) at the common calibrated KL: how much of the difference between the
two transforms' exact tilts (each at the M its target was calibrated with) the trained policies realise; NaN for
raw and maxk (no tilt) and on the sequence-KL rows (a closed form's KL is over calibrated ranks, so a tilt has no
sequence KL to be read at). Each comparison is made on the held-out prompts and, where the runs evaluated them
(`eval.held_in_prompts`), on the training prompts (`<metric>_held_in`). One row per ordering, matched space and
configuration (`config`: the sweep, solver(s), N and each side's beta; B's the one at the closest mean KL to A's).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from infalign.study.run_config import transform_from_run
from infalign.study.runs import final_metrics
from infalign.theory.efficiency import tilt_at_kl

__all__ = ["COLUMNS", "MATCHED", "MAXK_ORDERINGS", "ORDERINGS", "kl_fit", "matched_difference", "metric_column",
           "ordering_rows"]

ORDERINGS = (("bon_exp", "calibrated", "bon"), ("won_exp", "calibrated", "won"), ("calibrated", "raw", "std"))
# issue 31: the win rate optimised directly (solver=maxk, recorded as method maxk) against CTRL's transform and
# calibrated RL, each trained by its own solver, at the same N; a maxk run has no transform, so no tilt
MAXK_ORDERINGS = (("maxk", "bon_exp", "bon"), ("maxk", "calibrated", "bon"), ("maxk", "won_exp", "won"),
                  ("maxk", "calibrated", "won"))
MATCHED = {"calibrated_kl": "kl_calibrated", "kl": "kl"}  # orderings.csv's `matched` -> the run row's KL column
COLUMNS = ["a", "b", "metric", "matched", "diff", "se", "z", "seeds_a", "seeds_b", "shape_transfer",
           "shape_transfer_se", "config"]


def kl_fit(x, y) -> dict:
    """OLS of `y` on `x`: {n, mean_x, intercept, slope, s2 (residual variance, n - 2 dof), sxx}."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    mean_x = float(x.mean()) if n else math.nan
    sxx = float(((x - mean_x) ** 2).sum()) if n else 0.0
    if n < 2 or sxx <= 0:
        return {"n": n, "mean_x": mean_x, "intercept": math.nan, "slope": math.nan, "s2": math.nan, "sxx": sxx}
    slope = float(((x - mean_x) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * mean_x)
    s2 = float(((y - intercept - slope * x) ** 2).sum() / (n - 2)) if n > 2 else math.nan
    return {"n": n, "mean_x": mean_x, "intercept": intercept, "slope": slope, "s2": s2, "sxx": sxx}


def _at(fit: dict, x0: float) -> tuple[float, float]:
    if not math.isfinite(fit["slope"]):  # fewer than 2 runs or a single KL: no fit
        return math.nan, math.nan
    value = fit["intercept"] + fit["slope"] * x0
    var = fit["s2"] * (1.0 / fit["n"] + (x0 - fit["mean_x"]) ** 2 / fit["sxx"]) if fit["n"] > 2 else math.nan
    return value, math.sqrt(var) if math.isfinite(var) and var >= 0 else math.nan


def matched_difference(xa, ya, xb, yb, x0: float | None = None) -> dict:
    """A's fitted metric minus B's at the common KL `x0` (None: the mean of the two sides' mean KLs), with its
    s.e. from the two regressions: {kl, diff, se, z, a, se_a, b, se_b, slope_a, slope_b, seeds_a, seeds_b}."""
    fa, fb = kl_fit(xa, ya), kl_fit(xb, yb)
    if x0 is None:
        x0 = 0.5 * (fa["mean_x"] + fb["mean_x"])
    a, se_a = _at(fa, x0)
    b, se_b = _at(fb, x0)
    diff, se = a - b, math.sqrt(se_a**2 + se_b**2)
    z = diff / se if math.isfinite(se) and se > 0 else math.nan
    return {"kl": x0, "diff": diff, "se": se, "z": z, "a": a, "se_a": se_a, "b": b, "se_b": se_b,
            "slope_a": fa["slope"], "slope_b": fb["slope"], "seeds_a": fa["n"], "seeds_b": fb["n"]}


def metric_column(metric: str, n: int) -> str:
    """The run-row column of `metric` at N = `n` (std, bon@N, won@N)."""
    return "std" if metric == "std" else f"{metric}@{n}"


def _tilt(runs: list[dict], sweep_dir: Path, kl: float, n: int, metric: str) -> float:
    """The `metric` win rate of the tilt of these runs' transform (their first member's, at its yardstick M) at
    `kl`; NaN for raw and maxk (no transform) or when the tilt cannot spend `kl`."""
    first = runs[0]
    member_dir = Path(sweep_dir) / first["member"]
    try:
        transform = transform_from_run(final_metrics(member_dir), member_dir)
        if transform is None or not math.isfinite(kl):
            return math.nan
        return float(tilt_at_kl(transform, kl, n, first.get("m"))[metric])
    except (ValueError, FileNotFoundError):
        return math.nan


def _points(runs: list[dict], x: str, y: str) -> list[tuple[float, float]]:
    """(KL, metric) of the runs that have both finite."""
    return [(r[x], r[y]) for r in runs if math.isfinite(r.get(x, math.nan)) and math.isfinite(r.get(y, math.nan))]


def _comparisons(runs: list[dict]):
    """(solver_a, a, solver_b, b, n, metric) of every comparison the runs hold: each of ORDERINGS within one
    solver and N, and (issue 31) the maxk solver against each method of MAXK_ORDERINGS trained by another solver
    at the same N, on the metric the maxk runs were built for (their `metric`, bon or won)."""
    configs = list(dict.fromkeys((r["solver"], r["n"]) for r in runs))
    for solver, n in configs:
        for a, b, metric in ORDERINGS:
            yield solver, a, solver, b, n, metric
    for solver_b, n in configs:
        if solver_b == "maxk":
            continue
        for a, b, metric in MAXK_ORDERINGS:
            if any(r["solver"] == "maxk" and r["n"] == n and r.get("metric") == metric for r in runs):
                yield "maxk", a, solver_b, b, n, metric


def ordering_rows(runs: list[dict], sweep_dir: Path) -> list[dict]:
    """orderings.csv's rows (module docstring) from the study's run rows (`analysis.run_rows`)."""
    sweep_dir = Path(sweep_dir)
    out = []
    for solver_a, a, solver_b, b, n, metric in _comparisons(runs):
        col = metric_column(metric, n)
        arm_a = [r for r in runs if r["solver"] == solver_a and r["n"] == n and r["method"] == a
                 and (solver_a != "maxk" or r.get("metric") == metric)]
        arm_b = [r for r in runs if r["solver"] == solver_b and r["n"] == n and r["method"] == b]
        betas = {side: list(dict.fromkeys(r["beta"] for r in arm)) for side, arm in (("a", arm_a), ("b", arm_b))}
        if not betas["a"] or not betas["b"]:
            continue
        for beta_a in betas["a"]:
            side_a = [r for r in arm_a if r["beta"] == beta_a]
            mean_kl_a = float(np.mean([r["kl"] for r in side_a]))
            beta_b = min(betas["b"], key=lambda bb: abs(float(np.mean(
                [r["kl"] for r in arm_b if r["beta"] == bb])) - mean_kl_a))
            side_b = [r for r in arm_b if r["beta"] == beta_b]
            solvers = f"solver={solver_a}" if solver_a == solver_b else f"solver_a={solver_a} solver_b={solver_b}"
            config = f"{sweep_dir.name}: {solvers} N={n} beta_a={beta_a:g} beta_b={beta_b:g}"
            for (matched, kl_col), prompts in itertools.product(MATCHED.items(), ("held_out", "held_in")):
                # held_in: the same comparison on training prompts (eval.held_in_prompts), at the run's N only
                x, y = (kl_col, col) if prompts == "held_out" else (f"{kl_col}_held_in", f"{metric}_held_in")
                pa, pb = _points(side_a, x, y), _points(side_b, x, y)
                if not pa or not pb:
                    continue
                d = matched_difference(*zip(*pa), *zip(*pb))
                tilt = (_tilt(side_a, sweep_dir, d["kl"], n, metric) - _tilt(side_b, sweep_dir, d["kl"], n, metric)
                        if matched == "calibrated_kl" else math.nan)  # a tilt's KL is calibrated (docstring)
                ok = math.isfinite(tilt) and abs(tilt) > 1e-12
                out.append({"a": a, "b": b, "metric": col if prompts == "held_out" else f"{col}_held_in",
                            "matched": matched, "diff": d["diff"], "se": d["se"],
                            "z": d["z"], "seeds_a": d["seeds_a"], "seeds_b": d["seeds_b"],
                            "shape_transfer": d["diff"] / tilt if ok else math.nan,
                            "shape_transfer_se": d["se"] / abs(tilt) if ok else math.nan, "config": config,
                            "at_kl": d["kl"], "tilt_diff": tilt, "m_a": side_a[0].get("m"),
                            "m_b": side_b[0].get("m"), "slope_a": d["slope_a"], "slope_b": d["slope_b"]})
    return out
