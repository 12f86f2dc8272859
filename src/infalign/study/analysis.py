"""A sweep's runs as a study: gaps to theory per run, mean ± SE over seeds per method x beta, win rates at
matched KL.

Every number comes from the members' `final_metrics.json` (read by `infalign.study.runs`; measured on the
same held-out prompts against the same cached reference samples) and from `infalign.theory` evaluated at each
run's measured KL:

- theory for the run's transform: the beta at which the optimal policy for that transform spends the
  measured KL (`beta_for_kl`), then that policy's win rates. It is what the transform would give if RL
  reached its optimum; `raw` has no such value (its reward is uncalibrated, so no model-agnostic theory);
- the optimum: the best any policy can do at that KL (the fixed-point optimal transform for best-/worst-of-N,
  traced over beta; for the standard win rate the identity transform, which is optimal for N = 1).

`gap = measured - theoretical`: negative when the run falls short of the closed form.
numpy/scipy and infalign.theory only: no Lightning, no training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infalign.study.runs import collect_runs, logged_values, transform_from_run
from infalign.theory import beta_for_kl, default_grid, optimal_density, tilted_density

__all__ = ["Study", "analyze_sweep", "aggregate", "matched_kl", "optimum_curve", "optimum_at", "theory_at_kl",
           "run_rows"]

GRID_CELLS = 4096  # theory grid: win rates within ~1e-5 of the 16k default, far below any seed SE, 4x faster
KL_FLOOR = 1e-6  # at or below this measured KL (k1 can dip below 0 by sampling noise) the policy is the reference
BETA_START, BETA_STOP, PER_DECADE = 30.0, 1e-4, 8  # the optimum is traced from KL ~ 0 up to where it is needed
RAW_NOTE = "raw reward: uncalibrated, no closed-form theory for its transform (gap to the optimum only)"


def _grid():
    return default_grid(GRID_CELLS)


# ---------------------------------------------------------------------------------------------- theory
def theory_at_kl(transform, kl: float, n: int) -> dict:
    """Win rates of the optimal policy for `transform` that spends `kl` nats: {beta, std, bon, won}."""
    if kl <= KL_FLOOR:
        return {"beta": math.inf, "std": 0.5, "bon": 0.5, "won": 0.5}
    beta = beta_for_kl(transform, float(kl), _grid())
    d = tilted_density(transform, beta, _grid())
    return {"beta": beta, "std": d.win_rate(), "bon": d.bon_win_rate(n), "won": d.won_win_rate(n)}


_CURVES: dict[tuple[int, str], tuple[float, np.ndarray, np.ndarray]] = {}  # (n, mode) -> (KL reached, kls, wins)


def _trace_optimum(n: int, mode: str, kl_needed: float) -> tuple[np.ndarray, np.ndarray]:
    # Each beta costs a fixed-point solve (~0.05-0.4 s), so walk beta down only until the curve passes the
    # largest KL asked for.
    from infalign.core.transforms import IdentityTransform

    kls, wins = [0.0], [0.5]
    steps = int(math.ceil(math.log10(BETA_START / BETA_STOP) * PER_DECADE)) + 1
    for beta in np.geomspace(BETA_START, BETA_STOP, steps):
        if mode == "std":  # the standard win rate's optimum is the identity transform (N = 1)
            d = tilted_density(IdentityTransform(), float(beta), _grid())
            win = d.win_rate()
        else:
            d = optimal_density(n, mode, float(beta), _grid())
            win = d.bon_win_rate(n) if mode == "bon" else d.won_win_rate(n)
        if d.kl() > kls[-1]:  # KL grows as beta falls; drop numerically flat points so x stays increasing
            kls.append(d.kl())
            wins.append(win)
        if kls[-1] > kl_needed:
            break
    return np.array(kls), np.maximum.accumulate(np.array(wins))


def optimum_curve(n: int, mode: str, kl_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(KL, best achievable win rate) of the optimum from KL 0 to past `kl_max` (it may extend further: one
    curve per N and mode is kept and only ever extended); mode bon, won or std."""
    key = (1 if mode == "std" else int(n), mode)  # the standard win rate's optimum does not depend on N
    need = max(float(kl_max), 0.0) * 1.25 + 0.05
    if key not in _CURVES or _CURVES[key][0] < need:
        need = 2.0 ** math.ceil(math.log2(need))  # round up: a slightly larger KL later reuses this curve
        _CURVES[key] = (need, *_trace_optimum(*key, need))
    return _CURVES[key][1], _CURVES[key][2]


def optimum_at(n: int, mode: str, kl: float) -> float:
    """The optimum's win rate at `kl`: shape-preserving (PCHIP) interpolation of `optimum_curve`."""
    from scipy.interpolate import PchipInterpolator

    kl = max(float(kl), 0.0)
    kls, wins = optimum_curve(n, mode, kl)
    return float(PchipInterpolator(kls, wins)(min(kl, kls[-1])))


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


def run_rows(raw_rows: list[dict], sweep_dir: Path, kl_max: float | None = None) -> list[dict]:
    """One flat row per finished run: identity columns, measured win rates, theory, optimum and gaps."""
    if kl_max is None:
        kl_max = max([float(r.get("eval/kl", 0.0)) for r in raw_rows] + [0.0])
    for n in {int(r["n"]) for r in raw_rows}:  # trace each optimum once, far enough for every run
        for key in ("std", "bon", "won"):
            optimum_curve(n, key, kl_max)
    out = []
    for r in raw_rows:
        n = int(r["n"])
        row = {"member": r["member"], "method": r.get("method") or r.get("transform"), "transform": r.get("transform"),
               "n": n, "beta": float(r["beta"]), "t": r.get("t"), "seed": int(r.get("seed", 0)),
               "kl": float(r["eval/kl"])}
        row["length_start"], row["length_end"] = response_lengths(Path(sweep_dir) / r["member"])
        row["std"], row["std_pse"] = r.get("eval/bon_win_rate@1", math.nan), r.get("eval/bon_win_rate@1_se", math.nan)
        for big_n in _ns_of(r):  # `_pse`: the within-run standard error over prompts
            for mode in ("bon", "won"):
                row[f"{mode}@{big_n}"] = r[f"eval/{mode}_win_rate@{big_n}"]
                row[f"{mode}@{big_n}_pse"] = r[f"eval/{mode}_win_rate@{big_n}_se"]
        measured = {"std": row["std"], "bon": row.get(f"bon@{n}", math.nan), "won": row.get(f"won@{n}", math.nan)}
        note = ""
        if row["kl"] <= KL_FLOOR:
            note = "measured KL <= 0 (sampling noise): theory and optimum are the reference's 0.5"
        theory = {"beta": math.nan, "std": math.nan, "bon": math.nan, "won": math.nan}
        # rebuilt as data (infalign.study.runs: allow-listed transforms, the recorded t, never executed)
        transform = transform_from_run(r, Path(sweep_dir) / r["member"])
        if transform is None:
            note = RAW_NOTE
        else:
            try:
                theory = theory_at_kl(transform, row["kl"], n)
            except ValueError as e:  # e.g. won_exp with a large t cannot reach the measured KL
                note = f"theory n/a: {e}"
        row["theory_beta"] = theory["beta"]
        for key in ("std", "bon", "won"):
            opt = optimum_at(n, key, row["kl"]) if row["kl"] > KL_FLOOR else 0.5
            row[f"theory_{key}"], row[f"opt_{key}"] = theory[key], opt
            row[f"gap_theory_{key}"] = measured[key] - theory[key]
            row[f"gap_opt_{key}"] = measured[key] - opt
        row["note"] = note
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- seeds
def _mean_se(values) -> tuple[float, float, int]:
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, 0
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(np.mean(x)), se, len(x)


def aggregate(runs: list[dict]) -> list[dict]:
    """Per (method, n, beta), in sweep order: the mean over seeds of every measured and theory column and
    its standard error over seeds (`<col>_se`; NaN with a single seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["n"], r["beta"]), []).append(r)
    skip = {"member", "method", "transform", "n", "beta", "seed", "note"}
    out = []
    for (method, n, beta), members in groups.items():
        row = {"method": method, "transform": members[0]["transform"], "n": n, "beta": beta,
               "seeds": len(members), "seed_list": " ".join(str(m["seed"]) for m in sorted(members, key=lambda m: m["seed"]))}
        cols = [c for c in members[0] if c not in skip and not c.endswith("_pse")]
        for col in cols:
            mean, se, _ = _mean_se(m.get(col) for m in members)
            row[col] = mean
            if col != "t":
                row[f"{col}_se"] = se
        row["note"] = "; ".join(sorted({m["note"] for m in members if m["note"]}))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- matched KL
def _auto_kls(curves: dict[str, np.ndarray], points: int) -> list[float]:
    """`points` KL values spread over the range of measured KL that every method's curve covers; if the
    measured ranges do not overlap, over (0, the smallest of the methods' largest KL], which the curves cover
    through the reference point at KL 0 (empty if there is no KL at all)."""
    lo = max(float(k.min()) for k in curves.values())
    hi = min(float(k.max()) for k in curves.values())
    if hi > max(lo, 0.0):
        lo = max(lo, hi * 1e-3)
        return [float(x) for x in np.geomspace(lo, hi, points)]
    if hi == lo and hi > 0:
        return [hi]
    if hi > 0:
        return [float(x) for x in np.linspace(hi / points, hi, points)]
    return []


def matched_kl(groups: list[dict], kls=None, points: int = 3) -> list[dict]:
    """Win rates of every method at common KL values, interpolated linearly along its mean curve (KL sorted).

    `kls`: the KL values, or None for `points` values over the range all methods cover. A method whose
    curve does not reach a KL gets NaN there rather than an extrapolation. The SE is interpolated the
    same way (an approximation: neighbouring points are independent runs).

    Every curve starts at the reference itself (beta -> infinity: KL 0, every win rate exactly 0.5, no
    noise), so below a method's smallest measured KL it is interpolated towards that point and the row says
    `anchored: True`. Win-rate curves are concave in KL, so this chord is a lower bound of the method's curve
    there: a method is compared conservatively, never flattered.
    """
    out = []
    for n in sorted({g["n"] for g in groups}):
        curves = {}
        for method in dict.fromkeys(g["method"] for g in groups if g["n"] == n):
            pts = sorted((g for g in groups if g["n"] == n and g["method"] == method and math.isfinite(g["kl"])),
                         key=lambda g: g["kl"])
            if pts:
                curves[method] = pts
        if kls:
            targets = [float(k) for k in kls]
        else:
            targets = _auto_kls({m: np.array([p["kl"] for p in pts]) for m, pts in curves.items()}, points) if curves else []
        for kl in targets:
            for method, pts in curves.items():
                x = np.array([0.0] + [p["kl"] for p in pts])  # the reference point first (docstring)
                row = {"n": n, "kl": kl, "method": method, "anchored": bool(kl < x[1] - 1e-12)}
                inside = 0.0 <= kl <= x[-1] + 1e-12
                for key in ("std", "bon", "won"):
                    col = "std" if key == "std" else f"{key}@{n}"
                    for suffix, at_reference in (("", 0.5), ("_se", 0.0)):
                        y = np.array([at_reference] + [p.get(col + suffix, math.nan) for p in pts], dtype=float)
                        row[key + suffix] = float(np.interp(kl, x, y)) if inside else math.nan
                    row[f"opt_{key}"] = optimum_at(n, key, kl)
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- all
@dataclass
class Study:
    sweep_dir: Path
    runs: list[dict]  # one per finished run (run_rows)
    groups: list[dict]  # per method x n x beta, mean and SE over seeds (aggregate)
    matched: list[dict]  # win rates at common KL values (matched_kl)
    ns: list[int] = field(default_factory=list)  # every N with measured win rates
    methods: list[str] = field(default_factory=list)  # in sweep order

    @property
    def kl_max(self) -> float:
        return max([r["kl"] for r in self.runs] + [0.0])


def analyze_sweep(sweep_dir, kls=None, points: int = 3) -> Study:
    """Read every finished member of `sweep_dir` and compute the study (see the module docstring)."""
    sweep_dir = Path(sweep_dir)
    raw = [r for r in collect_runs(sweep_dir) if "eval/kl" in r]
    if not raw:
        raise FileNotFoundError(f"no finished runs with final win rates under {sweep_dir} (*/final_metrics.json)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean over all-NaN theory columns of raw
        runs = run_rows(raw, sweep_dir)
        groups = aggregate(runs)
        matched = matched_kl(groups, kls, points)
    ns = sorted({n for r in raw for n in _ns_of(r)})
    return Study(sweep_dir, runs, groups, matched, ns, list(dict.fromkeys(r["method"] for r in runs)))
