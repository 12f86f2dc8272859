"""A study's runs averaged over seeds: per (solver, method, n, beta), in sweep order, each column's mean and its
standard error over seeds (`<col>_se`; NaN with a single seed); `efficiency_rows` picks solver_efficiency.csv's.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["IDENTITY", "aggregate", "efficiency_rows"]


# ---------------------------------------------------------------------------------------------- seeds
def _mean_se(values) -> tuple[float, float, int]:
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, 0
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(np.mean(x)), se, len(x)


IDENTITY = ("member", "solver", "method", "transform", "n", "beta", "seed", "m", "calibration_m", "metric", "note")


def aggregate(runs: list[dict]) -> list[dict]:
    """Per (solver, method, n, beta), in sweep order: the mean over seeds of every measured, theory and
    efficiency column and its standard error over seeds (`<col>_se`; NaN with a single seed). `label` names the
    curve: the method, with the solver in brackets when the sweep has more than one solver."""
    several_solvers = len({r["solver"] for r in runs}) > 1
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["solver"], r["method"], r["n"], r["beta"]), []).append(r)
    out = []
    for (solver, method, n, beta), members in groups.items():
        first = members[0]
        row = {"label": f"{method} [{solver}]" if several_solvers else method, "solver": solver, "method": method,
               "transform": first["transform"], "n": n, "beta": beta, "metric": first.get("metric"), "m": first.get("m"),
               "calibration_m": first.get("calibration_m"),
               "seeds": len(members),
               "seed_list": " ".join(str(m["seed"]) for m in sorted(members, key=lambda m: m["seed"])),
               "members": " ".join(m["member"] for m in members)}
        cols = [c for c in first if c not in IDENTITY and not c.endswith("_pse")]
        for col in cols:
            mean, se, _ = _mean_se(m.get(col) for m in members)
            row[col] = mean
            if col != "t":
                row[f"{col}_se"] = se
        row["note"] = "; ".join(sorted({m["note"] for m in members if m["note"]}))
        out.append(row)
    return out


def efficiency_rows(groups: list[dict]) -> list[dict]:
    """solver_efficiency.csv: one row per solver x method x beta (x N), means over seeds (± s.e.) of the KL, the
    KL in calibrated space, the target metric's win rate, what the tilt and the optimum reach at that KL, and the
    gain fractions and KL efficiencies against both (infalign.theory.efficiency), the yardstick's M (`m`), the gain
    fraction on every metric against the same tilt (`gain_fraction_<std|bon|won>`) and held in (`*_held_in`, NaN
    without a held-in evaluation)."""
    cols = ("kl", "kl_calibrated", "win_rate", "tilt_win_rate_at_kl", "optimum_win_rate_at_kl", "gain_fraction",
            "kl_efficiency", "gain_fraction_optimum", "kl_efficiency_optimum",
            *(f"gain_fraction_{k}" for k in ("std", "bon", "won")), "kl_held_in",
            *(f"gain_fraction_{k}_held_in" for k in ("std", "bon", "won")), "tilt_slope", "tilt_shape")
    out = []
    for g in groups:
        row = {"solver": g["solver"], "method": g["method"], "n": g["n"], "beta": g["beta"], "seeds": g["seeds"],
               "metric": g.get("metric"), "m": g.get("m")}
        for col in cols:
            row[col] = g.get(col, math.nan)
            row[f"{col}_se"] = g.get(f"{col}_se", math.nan)
        out.append(row)
    return out
