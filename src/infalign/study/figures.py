"""Study figures: win rate vs KL per method (mean ± SE over seeds), the theoretical optimum for comparison.

    study_bon.png       best-of-N win rate vs KL, one panel per N of eval.ns (N > 1)
    study_won.png       worst-of-N win rate vs KL, likewise
    study_standard.png  standard win rate (N = 1) vs KL

Each method is a curve through its (mean KL, mean win rate) points over beta, with standard-error bars over
seeds on both axes; the seeds themselves are faint dots; a dotted chord joins each curve to the reference
(black star: KL 0, win rate 0.5) to guide the eye only: it is not measured, and the study reports no value
on it (matched KL stays inside each method's measured range). The black dashed line is the best win rate any
policy can reach at that KL (infalign.theory; for the standard win rate the identity transform).
With several solvers in one sweep each (method, solver) is its own curve (`label`).
"""

from __future__ import annotations

import math
from pathlib import Path

from infalign.runtime.atomic import atomic_write_figure
from infalign.study.analysis import Study, optimum_curve

__all__ = ["plot_metric", "study_figure", "write_figures", "TITLES"]

TITLES = {"bon": "best-of-{n} win rate", "won": "worst-of-{n} win rate", "std": "standard win rate"}


def _run_label(study: Study, run: dict) -> str:
    """The curve a run belongs to: its group's label (method, or method [solver] with several solvers)."""
    several = len({r["solver"] for r in study.runs}) > 1
    return f"{run['method']} [{run['solver']}]" if several else run["method"]


def _zero_nan(values):
    return [0.0 if not math.isfinite(v) else v for v in values]


def plot_metric(ax, study: Study, key: str, n: int, show_runs: bool = True, optimum: bool = True) -> None:
    """Win rate (`key`: bon, won or std; at N = `n`) vs KL on `ax`, one curve per method (and run n)."""
    col = "std" if key == "std" else f"{key}@{n}"
    labels = list(dict.fromkeys((g.get("label", g["method"]), g["n"]) for g in study.groups))
    several_n = len({lab[1] for lab in labels}) > 1  # a sweep over the run's n: one curve per (method, n)
    for i, (method, run_n) in enumerate(labels):
        pts = sorted((g for g in study.groups if (g.get("label", g["method"]), g["n"]) == (method, run_n) and col in g),
                     key=lambda g: g["kl"])
        if not pts:
            continue
        color = f"C{i % 10}"
        label = f"{method} (trained for N={run_n})" if several_n else method
        # dotted: the chord from the reference (KL 0, 0.5), a guide to the eye, never a reported value
        ax.plot([0.0, pts[0]["kl"]], [0.5, pts[0][col]], ":", lw=1.0, color=color)
        ax.errorbar([g["kl"] for g in pts], [g[col] for g in pts], xerr=_zero_nan([g["kl_se"] for g in pts]),
                    yerr=_zero_nan([g[f"{col}_se"] for g in pts]), fmt="-o", ms=4, capsize=3, color=color, label=label)
        if show_runs:
            runs = [r for r in study.runs if (_run_label(study, r), r["n"]) == (method, run_n) and col in r]
            ax.scatter([r["kl"] for r in runs], [r[col] for r in runs], s=9, alpha=0.3, color=color, linewidths=0)
    ax.plot([0.0], [0.5], "k*", ms=8, label="reference (KL 0)")
    kl_max = study.kl_max
    if optimum:
        kls, wins = optimum_curve(1 if key == "std" else n, key, kl_max)
        keep = kls <= kl_max * 1.15 + 0.02
        ax.plot(kls[keep], wins[keep], "k--", lw=1.2, label="theory: optimum")
    ax.set_xlim(min(0.0, min(r["kl"] for r in study.runs)) - 0.02 * (kl_max + 0.01), kl_max * 1.12 + 0.01)
    ax.set_xlabel("KL(policy || reference) [nats per response]")
    ax.set_ylabel(TITLES[key].format(n=n) + " vs reference")
    ax.set_title(TITLES[key].format(n=n))
    ax.grid(alpha=0.3)


def study_figure(study: Study, key: str, ns=None):
    """A matplotlib figure for `key` (bon, won: one panel per N > 1; std: one panel)."""
    import matplotlib.pyplot as plt

    ns = [1] if key == "std" else [n for n in (ns or study.ns) if n > 1] or [1]
    fig, axes = plt.subplots(1, len(ns), figsize=(4.6 * len(ns) + 0.6, 4.0), squeeze=False)
    for ax, n in zip(axes[0], ns):
        plot_metric(ax, study, key, n)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{study.sweep_dir.name}: mean ± s.e. over seeds, each point one beta", fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(study: Study, out_dir: Path | None = None) -> dict[str, Path]:
    """study_bon.png, study_won.png, study_standard.png in `out_dir` (default: the sweep directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or study.sweep_dir)
    paths = {}
    for key, name in (("bon", "study_bon.png"), ("won", "study_won.png"), ("std", "study_standard.png")):
        fig = study_figure(study, key)
        try:
            atomic_write_figure(out_dir / name, fig, dpi=110)  # a reader never sees half a PNG
        finally:
            plt.close(fig)
        paths[key] = out_dir / name
    return paths
