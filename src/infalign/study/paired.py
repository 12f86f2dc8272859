"""Paired comparisons of two methods on the same held-out prompts (a study's `study_paired.csv`).

Both sides are evaluated on the same prompts against the same cached reference samples, so the per-prompt
difference cancels what the prompts share; its standard error combines the prompts and the seeds. Beside each
difference, what the closed forms predict for it at the solver's gain fraction and the seeds a 3-s.e. result
needs (issue 15, item 5). numpy and infalign.study.runs only: no Lightning, no training.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from infalign.study.runs import per_prompt_rows

__all__ = ["curve_label", "paired_comparisons", "predicted_difference"]


def curve_label(g: dict) -> str:
    """The name of a group's curve: its label (method, with the solver when a sweep has several), else the method."""
    return g.get("label") or g["method"]


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
    second's point at the closest mean KL: the per-held-out-prompt difference of each of the two methods'
    target win rates (`eval_per_prompt.csv` of every seed), `diff` = mean over prompts of (first - second),
    each side averaged over its seeds.

    `se` combines the prompts and the seeds: `se_prompts` (the s.e. over prompts of the per-prompt
    differences, which carries the prompt-to-prompt spread and the evaluation's sampling noise) and `se_seeds`
    (the s.e. of the difference of the seed means, the shift a seed's whole policy gives every prompt; NaN with
    a single seed on either side, `se` is then `se_prompts` alone): `se = sqrt(se_prompts^2 + se_seeds^2)`,
    slightly conservative (the evaluation noise is in both). The two points' KLs are listed: matched, not equal.
    Runs without eval_per_prompt.csv (written before it existed) give no row."""
    tables: dict[str, dict] = {}

    def table(member: str) -> dict:
        if member not in tables:
            tables[member] = per_prompt_rows(Path(sweep_dir) / member)
        return tables[member]

    out = []
    for n in sorted({g["n"] for g in groups}):
        labels = list(dict.fromkeys(curve_label(g) for g in groups if g["n"] == n))
        points = {lab: [g for g in groups if g["n"] == n and curve_label(g) == lab and math.isfinite(g["kl"])] for lab in labels}
        for i, la in enumerate(labels):
            for lb in labels[i + 1:]:
                if not points[la] or not points[lb]:
                    continue
                for ga in sorted(points[la], key=lambda g: g["kl"]):
                    gb = min(points[lb], key=lambda g: abs(g["kl"] - ga["kl"]))
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

    `tilt_diff`: the `metric` win rate of group a's optimal tilt at a's measured KL minus b's at b's (the
    `theory_<metric>` columns: the exact fixed-cache form of each run's own transform at its yardstick M);
    `predicted_diff`: that difference scaled by the two groups' mean gain fraction **on that same metric**
    (`gain_fraction_<metric>`; never one group's target metric mixed with another's, issue 30 item 1): a
    solver that reaches a fraction g of every tilt's gain over 0.5 moves the difference by g too, an
    assumption the measured `diff` tests. At unmatched KL: the matched comparisons are study/orderings.py's.
    `z_predicted` = predicted_diff / se; `seeds_for_3se`: the seeds per
    side at which that prediction would be 3 s.e., with the same prompts and samples and se shrinking as
    1/sqrt(seeds) (the seeds of the smaller side scaled). NaN where a side has no theory (`raw`)."""
    tilt = ga.get(f"theory_{metric}", math.nan) - gb.get(f"theory_{metric}", math.nan)
    gain = 0.5 * (ga.get(f"gain_fraction_{metric}", math.nan) + gb.get(f"gain_fraction_{metric}", math.nan))
    predicted = gain * tilt
    z = predicted / se if se and math.isfinite(se) and se > 0 else math.nan
    seeds = min(int(ga["seeds"]), int(gb["seeds"]))
    need = math.ceil(seeds * (3.0 / abs(z)) ** 2) if math.isfinite(z) and z != 0 else math.nan
    return {"tilt_diff": tilt, "gain_fraction": gain, "predicted_diff": predicted, "z_predicted": z,
            "seeds_for_3se": need}
