"""Paired comparisons of two methods on the same held-out prompts (a study's `study_paired.csv`).

Both sides are evaluated on the same prompts against the same cached reference samples, so the per-prompt
difference cancels what the prompts share; beside it what the closed forms predict for it and the seeds a 3-s.e.
result needs (issue 15, item 5).
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np

from infalign.study.runs import per_prompt_rows

__all__ = ["curve_label", "curves_at", "paired_comparisons", "predicted_difference"]


def curve_label(g: dict) -> str:
    """The name of a group's curve: its label (method, with the solver when a sweep has several), else the method."""
    return g.get("label") or g["method"]


def curves_at(groups: list[dict], n: int) -> dict[str, list[dict]]:
    """The curves trained for N = `n`, in sweep order: each label's groups with a finite KL, sorted by KL."""
    curves = {}
    for g in sorted((g for g in groups if g["n"] == n and math.isfinite(g["kl"])), key=lambda g: g["kl"]):
        curves.setdefault(curve_label(g), []).append(g)
    labels = dict.fromkeys(curve_label(g) for g in groups if g["n"] == n)
    return {label: curves[label] for label in labels if label in curves}


def _paired(a: list[dict], b: list[dict], column: str) -> dict:
    """Per-prompt difference of `column` between two sets of runs' per-prompt tables (each a list over seeds of
    {prompt_id: {column: value}}): mean over prompts of (mean over a's seeds - mean over b's seeds), and its s.e."""
    prompts = sorted(set.intersection(*(set(p for p, r in t.items() if column in r) for t in a + b)))
    if len(prompts) < 2:
        return {"prompts": len(prompts), "diff": math.nan, "se": math.nan, "se_prompts": math.nan, "se_seeds": math.nan}
    wa = np.array([[t[p][column] for p in prompts] for t in a])  # [seeds, prompts]
    wb = np.array([[t[p][column] for p in prompts] for t in b])
    d = wa.mean(0) - wb.mean(0)
    se_prompts = float(np.std(d, ddof=1) / math.sqrt(len(d)))
    if len(a) > 1 and len(b) > 1:  # the seeds' whole-policy differences, which every prompt shares
        ma, mb = wa.mean(1), wb.mean(1)
        se_seeds = float(math.sqrt(np.var(ma, ddof=1) / len(ma) + np.var(mb, ddof=1) / len(mb)))
        se = math.sqrt(se_prompts**2 + se_seeds**2)
    else:
        se_seeds, se = math.nan, se_prompts
    return {"prompts": len(prompts), "diff": float(d.mean()), "se": se, "se_prompts": se_prompts, "se_seeds": se_seeds}


def paired_comparisons(groups: list[dict], sweep_dir: Path) -> list[dict]:
    """For every pair of methods (curves, in sweep order, at the same N) and every point of the first, the
    second's point at the closest mean KL: `diff` = mean over held-out prompts of (first - second) on each of
    the two methods' target win rates, each side averaged over its seeds (`eval_per_prompt.csv`; runs without
    it give no row). `se = sqrt(se_prompts^2 + se_seeds^2)`: the s.e. over prompts of the per-prompt differences
    (prompt spread and evaluation noise) and of the difference of the seed means (the shift a seed's whole policy
    gives every prompt; NaN with a single seed on a side, `se` is then `se_prompts`), slightly conservative."""
    table = functools.cache(lambda member: per_prompt_rows(Path(sweep_dir) / member))

    out = []
    for n in sorted({g["n"] for g in groups}):
        curves = curves_at(groups, n)
        for la, lb in itertools.combinations(curves, 2):
            for ga in curves[la]:
                gb = min(curves[lb], key=lambda g: abs(g["kl"] - ga["kl"]))
                ta = [table(m) for m in ga["members"].split()]
                tb = [table(m) for m in gb["members"].split()]
                if not all(ta) or not all(tb):
                    continue
                metrics = [k for k in dict.fromkeys((ga.get("metric"), gb.get("metric"))) if k]
                for metric in metrics:
                    column = "bon_win_rate@1" if metric == "std" else f"{metric}_win_rate@{n}"
                    row = {"n": n, "metric": metric, "method_a": la, "beta_a": ga["beta"], "kl_a": ga["kl"],
                           "seeds_a": ga["seeds"], "method_b": lb, "beta_b": gb["beta"], "kl_b": gb["kl"],
                           "seeds_b": gb["seeds"], **_paired(ta, tb, column)}
                    out.append({**row, **predicted_difference(ga, gb, metric, row["se"])})
    return out


def predicted_difference(ga: dict, gb: dict, metric: str, se: float) -> dict:
    """What the closed forms predict for a paired row, and whether the study can resolve it (issue 15, item 5).

    `tilt_diff`: a's optimal tilt's `metric` win rate at a's measured KL minus b's at b's (`theory_<metric>`);
    `predicted_diff`: that times the two groups' mean gain fraction on that same metric (issue 30 item 1: a
    solver reaching a fraction g of every tilt's gain moves the difference by g too, which `diff` tests);
    `z_predicted` = predicted_diff / se; `seeds_for_3se`: the seeds per side at which it would be 3 s.e. (se
    shrinking as 1/sqrt(seeds), the smaller side's seeds scaled). NaN where a side has no theory (`raw`)."""
    tilt = ga.get(f"theory_{metric}", math.nan) - gb.get(f"theory_{metric}", math.nan)
    gain = 0.5 * (ga.get(f"gain_fraction_{metric}", math.nan) + gb.get(f"gain_fraction_{metric}", math.nan))
    predicted = gain * tilt
    z = predicted / se if se and math.isfinite(se) and se > 0 else math.nan
    seeds = min(int(ga["seeds"]), int(gb["seeds"]))
    need = math.ceil(seeds * (3.0 / abs(z)) ** 2) if math.isfinite(z) and z != 0 else math.nan
    return {"tilt_diff": tilt, "gain_fraction": gain, "predicted_diff": predicted, "z_predicted": z,
            "seeds_for_3se": need}
