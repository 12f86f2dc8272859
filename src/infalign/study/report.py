"""Write a study's tables and figures into its sweep directory.

    study_runs.csv        one row per run: measured win rates (all N), KL, theory and optimum at that KL, gaps
    study_results.csv     per method x beta: mean over seeds and standard error over seeds of every column
    study_matched_kl.csv  every method's win rates interpolated at common KL values, with the optimum there
    solver_efficiency.csv per solver x method x beta: KL, KL in calibrated space, target win rate, what the tilt
                          and the optimum reach at that KL, gain fraction and KL efficiency (infalign.theory.efficiency)
    study_paired.csv      paired per-prompt differences of the target win rates between methods at matched KL
    orderings.csv         the three claimed orderings at matched calibrated KL and matched sequence KL, with the
                          shape transfer (infalign.study.orderings)
    study_results.md      the summary tables in markdown, the figures and how to read them
    study_{bon,won,standard}.png   see infalign.study.figures
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from infalign.runtime.atomic import atomic_write_csv, atomic_write_text
from infalign.study.analysis import RAW_NOTE, Study, analyze_sweep
from infalign.study.figures import write_figures
from infalign.study.orderings import COLUMNS as ORDERING_COLUMNS

log = logging.getLogger(__name__)

__all__ = ["EFFICIENCY_COLUMNS", "write_study", "markdown", "study_kls_from_sweep"]

# solver_efficiency.csv: these first, in this order (then their standard errors over seeds)
EFFICIENCY_COLUMNS = ["solver", "method", "n", "beta", "seeds", "kl", "metric", "win_rate", "optimum_win_rate_at_kl",
                      "gain_fraction", "kl_efficiency", "kl_calibrated", "tilt_win_rate_at_kl", "gain_fraction_optimum",
                      "kl_efficiency_optimum", "m", "gain_fraction_std", "gain_fraction_bon", "gain_fraction_won",
                      "kl_held_in", "gain_fraction_std_held_in", "gain_fraction_bon_held_in",
                      "gain_fraction_won_held_in"]
METRIC_NAMES = {"bon": "best-of-N", "won": "worst-of-N", "std": "standard"}


def _write_csv(path: Path, rows: list[dict], first: list[str] = ()) -> None:
    atomic_write_csv(path, rows, list(dict.fromkeys([*first, *(k for r in rows for k in r)])) or ["empty"])


def _pm(mean, se=None, digits: int = 3, sign: str = "") -> str:
    """`0.712 ± 0.014` (`sign` "+": `+0.012 ± 0.004`); `n/a` for a missing mean; no ± without an s.e."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:{sign}.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def _cell(v, spec: str, missing: str = "n/a") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else missing


def _lengths(g: dict) -> str:
    start, end = g.get("length_start", math.nan), g.get("length_end", math.nan)
    return "" if not (math.isfinite(start) and math.isfinite(end)) else f"{start:.0f} → {end:.0f}"


def _section(title: str, intro: str | None, header: list[str], rows: list[list[str]], empty: str | None = None):
    """A markdown section: its title, the paragraph saying how to read it, its table (or `empty` without rows)."""
    lines = [f"## {title}", ""] + ([intro, ""] if intro else [])
    if not rows and empty:
        return lines + [empty, ""]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
    return lines + table + [""]


def _metric_name(metric: str, n: int | None = None) -> str:
    name = METRIC_NAMES.get(metric, str(metric))
    return name if n is None or metric == "std" else f"{name}@{n}"


def markdown(study: Study, figures: dict[str, Path] | None = None) -> str:
    ns_run = sorted({g["n"] for g in study.groups})
    seeds = sorted({g["seeds"] for g in study.groups})
    lines = [f"# Study results: `{study.sweep_dir.name}`", "",
             f"{len(study.runs)} runs; methods: {', '.join(study.methods)}; trained for N = "
             f"{', '.join(map(str, ns_run))}; seeds per point: {', '.join(map(str, seeds))}. Win rates are against the "
             "reference policy on the same held-out prompts and cached reference samples for every run; "
             "`±` is the standard error over seeds. KL is the k1 estimate in nats per response.", ""]
    rows = [[g.get("label", g["method"]), str(g["n"]), f"{g['beta']:.4g}", _cell(g.get("t"), ".3g", ""),
             str(g["seeds"]), _pm(g["kl"], g["kl_se"]), _pm(g.get(f"bon@{g['n']}"), g.get(f"bon@{g['n']}_se")),
             _pm(g.get(f"won@{g['n']}"), g.get(f"won@{g['n']}_se")), _pm(g["std"], g["std_se"]),
             " / ".join(_pm(g[f"gap_theory_{k}"], sign="+") for k in ("bon", "won", "std")),
             " / ".join(_pm(g[f"gap_opt_{k}"], sign="+") for k in ("bon", "won", "std")), _lengths(g)]
            for g in study.groups]
    lines += _section("Win rate vs KL (mean ± s.e. over seeds)", None,
                      ["method", "N", "beta", "t", "seeds", "KL", "best-of-N", "worst-of-N", "standard",
                       "gap to theory (BoN / WoN / std)", "gap to optimum (BoN / WoN / std)", "length"], rows)
    rows = [[str(m["n"]), f"{m['kl']:.3g}", m["method"], _pm(m["bon"], m["bon_se"]), _pm(m["won"], m["won_se"]),
             _pm(m["std"], m["std_se"]), " / ".join(f"{m[f'opt_{k}']:.3f}" for k in ("bon", "won", "std"))]
            for m in study.matched]
    lines += _section(
        "At matched KL",
        "Each method's mean curve interpolated linearly at common KL values, only inside the KL range the "
        "method measured (n/a: below its smallest or beyond its largest measured KL; no extrapolation, and no "
        "interpolation towards the reference). The s.e. is interpolated likewise.",
        ["N", "KL", "method", "best-of-N", "worst-of-N", "standard", "optimum (BoN / WoN / std)"], rows,
        "(no KL range common to every method's measured KLs: widen the beta grids or pass KL values)")
    rows = [[e["solver"], e["method"], str(e["n"]), f"{e['beta']:.4g}", str(e["seeds"]), _pm(e["kl"], e["kl_se"]),
             _pm(e["kl_calibrated"], e["kl_calibrated_se"]), _metric_name(e["metric"]),
             _pm(e["win_rate"], e["win_rate_se"]), _pm(e["tilt_win_rate_at_kl"]),
             _pm(e["gain_fraction"], e["gain_fraction_se"], 2), _pm(e["kl_efficiency"], e["kl_efficiency_se"], 2),
             _pm(e["optimum_win_rate_at_kl"]), _pm(e["gain_fraction_optimum"], e["gain_fraction_optimum_se"], 2),
             _pm(e["kl_efficiency_optimum"], e["kl_efficiency_optimum_se"], 2), str(e.get("m")),
             " / ".join(_pm(e[f"gain_fraction_{k}"], None, 2) for k in ("std", "bon", "won"))]
            for e in study.efficiency]
    lines += _section(
        "KL efficiency of the solver (mean ± s.e. over seeds)",
        "On each method's target metric (best-of-N at the run's N for bon_exp and bon_distill, worst-of-N for "
        "won_exp, the standard win rate for calibrated and raw). *gain fraction* = (win rate - 0.5) / (what "
        "the curve reaches at the run's KL - 0.5); *KL efficiency* = the KL the curve needs for the run's win "
        "rate / the KL the run spent. Against the tilt of the run's own transform (through its M-sample "
        "calibration): the solver's shortfall; against the optimum: the solver's and the transform's. 1: on "
        "the curve; n/a for raw against the tilt (no closed form). Table: solver_efficiency.csv.",
        ["solver", "method", "N", "beta", "seeds", "KL", "KL calibrated", "metric", "win rate", "tilt at KL",
         "gain fraction", "KL efficiency", "optimum at KL", "gain fr. (opt.)", "KL eff. (opt.)", "M",
         "gain fr. std / BoN / WoN"], rows)
    rows = [[str(p["n"]), _metric_name(p["metric"], p["n"]), f"{p['method_a']} ({p['beta_a']:.3g}, {p['kl_a']:.3g})",
             f"{p['method_b']} ({p['beta_b']:.3g}, {p['kl_b']:.3g})", str(p["prompts"]),
             _pm(p["diff"], p["se"], sign="+"), _cell(p.get("predicted_diff", math.nan), "+.3f", ""),
             _cell(p.get("z_predicted", math.nan), ".1f", ""), _cell(p.get("seeds_for_3se", math.nan), "d", "")]
            for p in study.paired]
    lines += _section(
        "Paired comparisons on the held-out prompts",
        "For each pair of methods and each beta of the first, the second's beta at the closest mean KL: the "
        "mean over held-out prompts of the per-prompt difference of the target win rate (first - second; "
        "each side averaged over its seeds, from eval_per_prompt.csv), ± the s.e. over prompts and seeds "
        "(sqrt(s.e. over prompts² + s.e. of the seed means' difference²)). The same prompts and reference "
        "samples on both sides make this much sharper than comparing the two means. *predicted*: the "
        "difference of the two methods' optimal tilts at their measured KLs (closed form) times the two "
        "groups' mean gain fraction on that same metric (unmatched KL: see the orderings below); *z*: "
        "predicted / s.e.; *seeds for 3 s.e.*: the seeds per side at which "
        "the prediction would be 3 s.e. (s.e. ~ 1/sqrt(seeds), same prompts and samples). Table: "
        "study_paired.csv.",
        ["N", "metric", "method A (beta, KL)", "method B (beta, KL)", "prompts", "A - B", "predicted", "z",
         "seeds for 3 s.e."], rows, "(no pairs: fewer than two methods, or runs without eval_per_prompt.csv)")
    rows = [[o["a"], o["b"], o["metric"], o["matched"], _cell(o["at_kl"], ".3g"), f"{o['seeds_a']} / {o['seeds_b']}",
             _pm(o["diff"], o["se"], sign="+"), _cell(o["z"], ".1f"), _cell(o["tilt_diff"], "+.3f"),
             _pm(o["shape_transfer"], o["shape_transfer_se"], 2, "+"), o["config"]] for o in study.orderings]
    lines += _section(
        "The claimed orderings at matched KL",
        "bon_exp > calibrated on best-of-N, won_exp > calibrated on worst-of-N, calibrated >= raw on the "
        "standard win rate, where both methods ran: each method's metric regressed on KL across its seeds, "
        "both fits evaluated at the mean of the two sides' mean KLs, A - B ± the s.e. from the two "
        "regressions; matched on the KL in calibrated space and on the sequence KL. *shape transfer*: "
        "(A - B) / (tilt A - tilt B), the tilts the closed forms of each side's transform at the M its target "
        "was calibrated with (distillation: the pool's M - 1) spending that KL. Table: orderings.csv "
        "(infalign.study.orderings).",
        ["A", "B", "metric", "matched on", "at KL", "seeds", "A - B", "z", "tilt A - B", "shape transfer", "config"],
        rows, "(none: no pair of methods of the three orderings ran in one configuration)")
    if figures:
        lines += ["## Figures", ""] + [f"![{k}]({p.name})" for k, p in figures.items()] + [""]
    lines += ["## How to read the gaps", "",
              "- *gap to theory* = measured - the win rate of the optimal policy for the run's own transform at "
              "the run's measured KL (infalign.theory: beta_for_kl in calibrated-reward space on the transform seen "
              "through the M-sample calibration its target was built with: calibration.m for RL, distill.m - 1 "
              "for distillation; exact fixed-cache form, then the closed form). "
              "Near 0: RL reached what the transform promises at that KL; negative: it fell short.",
              "- *gap to optimum* = measured - the best win rate any policy can reach at that KL (the "
              "fixed-point optimal transform for best-/worst-of-N; identity for the standard win rate).",
              "- *length*: mean response length in tokens of the training rollouts, first iteration (the "
              "reference) → last 3 iterations; a large change means the policy wins partly by answer length.",
              f"- `raw`: {RAW_NOTE}.",
              "- *KL calibrated*: the KL of the policy's rank distribution among the reference samples (pooled over "
              "prompts, Miller-Madow corrected), a lower bound of the sequence KL: how much of the KL spent moves "
              "the calibrated reward at all.",
              "- Per-run values, the theory and optimum themselves and every N of eval.ns: study_runs.csv; "
              "per method x beta with s.e.: study_results.csv; matched KL: study_matched_kl.csv; efficiency: "
              "solver_efficiency.csv; paired comparisons: study_paired.csv.", ""]
    return "\n".join(lines)


def study_kls_from_sweep(sweep_dir: Path):
    """`study.matched_kl` from the sweep's saved config (multirun.yaml), if the study preset set it."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return None
    cfg = OmegaConf.load(path)
    kls = OmegaConf.select(cfg, "study.matched_kl", default=None)
    return list(kls) if kls else None


def write_study(sweep_dir, kls=None, points: int = 3) -> dict[str, Path]:
    """Analyse the sweep (infalign.study.analysis) and write every table and figure; returns their paths."""
    sweep_dir = Path(sweep_dir)
    study = analyze_sweep(sweep_dir, kls if kls is not None else study_kls_from_sweep(sweep_dir), points)
    tables = {"runs": ("study_runs.csv", study.runs, ()), "results": ("study_results.csv", study.groups, ()),
              "matched_kl": ("study_matched_kl.csv", study.matched, ()),
              "efficiency": ("solver_efficiency.csv", study.efficiency, EFFICIENCY_COLUMNS),
              "paired": ("study_paired.csv", study.paired, ())}
    paths = {name: sweep_dir / file for name, (file, _, _) in tables.items()}
    for name, (_, rows, first) in tables.items():
        _write_csv(paths[name], rows, first)
    paths["orderings"], paths["markdown"] = sweep_dir / "orderings.csv", sweep_dir / "study_results.md"
    atomic_write_csv(paths["orderings"], [{k: o.get(k, math.nan) for k in ORDERING_COLUMNS} for o in study.orderings],
                     ORDERING_COLUMNS)  # exactly these columns (the markdown shows the KL and tilts beside them)
    figures = write_figures(study, sweep_dir)
    atomic_write_text(paths["markdown"], markdown(study, figures))
    paths.update({f"figure_{k}": p for k, p in figures.items()})
    log.info("study: %s", ", ".join(str(p) for p in paths.values()))
    return paths
