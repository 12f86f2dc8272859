"""Write a study's tables and figures into its sweep directory.

    study_runs.csv        one row per run: measured win rates (all N), KL, theory and optimum at that KL, gaps
    study_results.csv     per method x beta: mean over seeds and standard error over seeds of every column
    study_matched_kl.csv  every method's win rates interpolated at common KL values, with the optimum there
    study_results.md      the two summary tables in markdown, the figures and how to read them
    study_{bon,won,standard}.png   see infalign.study.figures
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from infalign.runtime.atomic import atomic_write_csv, atomic_write_text
from infalign.study.analysis import RAW_NOTE, Study, analyze_sweep
from infalign.study.figures import write_figures

log = logging.getLogger(__name__)

__all__ = ["write_study", "markdown", "study_kls_from_sweep"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, rows, list(dict.fromkeys(k for r in rows for k in r)) or ["empty"])


def _pm(mean, se, digits: int = 3) -> str:
    """`0.712 ± 0.014`; `n/a` for a missing mean; no ± with a single seed."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def _signed(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.3f}"


def _lengths(g: dict) -> str:
    start, end = g.get("length_start", math.nan), g.get("length_end", math.nan)
    return "" if not (math.isfinite(start) and math.isfinite(end)) else f"{start:.0f} → {end:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(study: Study, figures: dict[str, Path] | None = None) -> str:
    ns_run = sorted({g["n"] for g in study.groups})
    seeds = sorted({g["seeds"] for g in study.groups})
    lines = [f"# Study results: `{study.sweep_dir.name}`", "",
             f"{len(study.runs)} runs; methods: {', '.join(study.methods)}; trained for N = "
             f"{', '.join(map(str, ns_run))}; seeds per point: {', '.join(map(str, seeds))}. Win rates are against the "
             "reference policy on the same held-out prompts and cached reference samples for every run; "
             "`±` is the standard error over seeds. KL is the k1 estimate in nats per response.", ""]
    lines += ["## Win rate vs KL (mean ± s.e. over seeds)", ""]
    header = ["method", "N", "beta", "t", "seeds", "KL", "best-of-N", "worst-of-N", "standard",
              "gap to theory (BoN / WoN / std)", "gap to optimum (BoN / WoN / std)", "length"]
    rows = []
    for g in study.groups:
        n = g["n"]
        t = g.get("t")
        rows.append([g["method"], str(n), f"{g['beta']:.4g}", "" if t is None or not math.isfinite(t) else f"{t:.3g}",
                     str(g["seeds"]), _pm(g["kl"], g["kl_se"]), _pm(g.get(f"bon@{n}"), g.get(f"bon@{n}_se")),
                     _pm(g.get(f"won@{n}"), g.get(f"won@{n}_se")), _pm(g["std"], g["std_se"]),
                     " / ".join(_signed(g[f"gap_theory_{k}"]) for k in ("bon", "won", "std")),
                     " / ".join(_signed(g[f"gap_opt_{k}"]) for k in ("bon", "won", "std")),
                     _lengths(g)])
    lines += _table(header, rows) + [""]
    lines += ["## At matched KL", "",
              "Each method's mean curve interpolated linearly at common KL values (n/a: beyond the largest KL the "
              "method's betas reached; no extrapolation). The s.e. is interpolated likewise. Every curve starts at "
              "the reference (KL 0, win rate 0.5); `*`: the KL lies below the method's smallest measured KL, so the "
              "value is on the chord from the reference, a lower bound for a concave curve.", ""]
    if study.matched:
        header = ["N", "KL", "method", "best-of-N", "worst-of-N", "standard", "optimum (BoN / WoN / std)"]
        rows = [[str(m["n"]), f"{m['kl']:.3g}", m["method"] + ("*" if m.get("anchored") else ""),
                 _pm(m["bon"], m["bon_se"]), _pm(m["won"], m["won_se"]), _pm(m["std"], m["std_se"]),
                 " / ".join(f"{m[f'opt_{k}']:.3f}" for k in ("bon", "won", "std"))]
                for m in study.matched]
        lines += _table(header, rows) + [""]
    else:
        lines += ["(no KL range common to every method: widen the beta grids or pass KL values)", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{k}]({p.name})" for k, p in figures.items()] + [""]
    lines += ["## How to read the gaps", "",
              "- *gap to theory* = measured - the win rate of the optimal policy for the run's own transform at "
              "the run's measured KL (infalign.theory: beta_for_kl in calibrated-reward space, then the closed "
              "form). Near 0: RL reached what the transform promises at that KL; negative: it fell short.",
              "- *gap to optimum* = measured - the best win rate any policy can reach at that KL (the "
              "fixed-point optimal transform for best-/worst-of-N; identity for the standard win rate).",
              "- *length*: mean response length in tokens of the training rollouts, first iteration (the "
              "reference) → last 3 iterations; a large change means the policy wins partly by answer length.",
              f"- `raw`: {RAW_NOTE}.",
              "- Per-run values, the theory and optimum themselves and every N of eval.ns: study_runs.csv; "
              "per method x beta with s.e.: study_results.csv; matched KL: study_matched_kl.csv.", ""]
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
    paths = {"runs": sweep_dir / "study_runs.csv", "results": sweep_dir / "study_results.csv",
             "matched_kl": sweep_dir / "study_matched_kl.csv", "markdown": sweep_dir / "study_results.md"}
    _write_csv(paths["runs"], study.runs)
    _write_csv(paths["results"], study.groups)
    _write_csv(paths["matched_kl"], study.matched)
    figures = write_figures(study, sweep_dir)
    atomic_write_text(paths["markdown"], markdown(study, figures))
    paths.update({f"figure_{k}": p for k, p in figures.items()})
    log.info("study: %s", ", ".join(str(p) for p in paths.values()))
    return paths
