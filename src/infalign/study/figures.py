"""Study figures: win rate vs KL per method (mean ± s.e. over seeds) against the best any policy reaches.

study_bon.png, study_won.png (one panel per N of eval.ns, N > 1) and study_standard.png (N = 1). Each curve runs
through a method's points over beta (each named by its beta; one seed: that run's own s.e. over the eval prompts),
the seeds faint beside it; the dotted chord to the reference (KL 0, 0.5) only guides the eye, no value is reported
on it. `metric_series` is what a panel draws, as data (tests/test_figures.py); `plot_metric` only draws it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from infalign.runtime.atomic import atomic_write_figure
from infalign.study.analysis import Study, metric_column, optimum_curve
from infalign.study.runs import per_prompt_rows

__all__ = ["metric_series", "plot_metric", "study_figure", "write_figures", "TITLES"]

TITLES = {"bon": "best-of-{n} win rate", "won": "worst-of-{n} win rate", "std": "standard win rate"}


def _run_label(study: Study, run: dict) -> str:
    """The curve a run belongs to: its group's label (method, or method [solver] with several solvers)."""
    several = len({r["solver"] for r in study.runs}) > 1
    return f"{run['method']} [{run['solver']}]" if several else run["method"]


def _zero_nan(values):
    return [0.0 if not math.isfinite(v) else v for v in values]


def _curves(study: Study) -> list[tuple[str, int]]:
    """The curves of every panel, (label, trained N), in sweep order: their index is their colour in all panels."""
    return list(dict.fromkeys((g.get("label", g["method"]), g["n"]) for g in study.groups))


def _single_seed_se(study: Study, member: str, col: str) -> tuple[float, float]:
    """(KL s.e., win-rate s.e.) of one run over the eval prompts: a point with one seed has no spread over seeds,
    but the run measured its own s.e. (the win rate's recorded `_se`; the KL's from eval_per_prompt.csv, NaN
    for runs written before it)."""
    run = next(r for r in study.runs if r["member"] == member)
    kls = [row["kl"] for row in per_prompt_rows(study.sweep_dir / member).values() if "kl" in row]
    kl_se = float(np.std(kls, ddof=1) / math.sqrt(len(kls))) if len(kls) > 1 else math.nan
    return kl_se, run.get(f"{col}_pse", math.nan)


def metric_series(study: Study, key: str, n: int, show_runs: bool = True, optimum: bool = True) -> list[dict]:
    """What `plot_metric` draws, as data: one dict per series, in drawing order (`kind`):

    - "method": a curve's mean points over beta, sorted by KL: label (method and the N it trained for), color,
      x, y, xerr, yerr, betas (one per point), seeds (per point), method, n;
      error bars: the s.e. over seeds, or with a single seed that run's own s.e. over the eval prompts;
    - "seeds": the same curve's runs, one faint dot each (label None: not in the legend);
    - "reference": the star at (KL 0, win rate 0.5); "optimum": the best any policy reaches at N = `n`."""
    col = metric_column(key, n)
    out = []
    for i, (label, run_n) in enumerate(_curves(study)):
        color = f"C{i % 10}"  # by the curve's index over all panels: one colour per method in every panel
        pts = sorted((g for g in study.groups if (g.get("label", g["method"]), g["n"]) == (label, run_n) and col in g),
                     key=lambda g: g["kl"])
        if not pts:
            continue
        xerr, yerr = [], []
        for g in pts:
            if g["seeds"] > 1:
                xerr.append(g["kl_se"])
                yerr.append(g[f"{col}_se"])
            else:
                kl_se, win_se = _single_seed_se(study, g["members"], col)
                xerr.append(kl_se)
                yerr.append(win_se)
        out.append({"kind": "method", "label": f"{label} (trained for N={run_n})", "color": color,
                    "method": label, "n": run_n, "x": [g["kl"] for g in pts], "y": [g[col] for g in pts],
                    "xerr": xerr, "yerr": yerr, "betas": [g["beta"] for g in pts], "seeds": [g["seeds"] for g in pts]})
        if show_runs:
            runs = [r for r in study.runs if (_run_label(study, r), r["n"]) == (label, run_n) and col in r]
            out.append({"kind": "seeds", "label": None, "color": color, "method": label, "n": run_n,
                        "x": [r["kl"] for r in runs], "y": [r[col] for r in runs]})
    out.append({"kind": "reference", "label": "reference (KL 0)", "color": "k", "x": [0.0], "y": [0.5]})
    if optimum:
        kls, wins = optimum_curve(1 if key == "std" else n, key, study.kl_max)
        keep = kls <= study.kl_max * 1.15 + 0.02
        out.append({"kind": "optimum", "label": "theory: optimum (best any policy reaches)", "color": "k",
                    "n": 1 if key == "std" else n, "x": list(kls[keep]), "y": list(wins[keep])})
    return out


def plot_metric(ax, study: Study, key: str, n: int, show_runs: bool = True, optimum: bool = True) -> None:
    """Win rate (`key`: bon, won or std; at N = `n`) vs KL on `ax`: draws `metric_series`."""
    for s in metric_series(study, key, n, show_runs, optimum):
        if s["kind"] == "method":
            # dotted: the chord from the reference (KL 0, 0.5), a guide to the eye, never a reported value
            ax.plot([0.0, s["x"][0]], [0.5, s["y"][0]], ":", lw=1.0, color=s["color"])
            ax.errorbar(s["x"], s["y"], xerr=_zero_nan(s["xerr"]), yerr=_zero_nan(s["yerr"]), fmt="-o", ms=4,
                        capsize=3, color=s["color"], label=s["label"])
            for x, y, beta in zip(s["x"], s["y"], s["betas"]):  # what varies along a curve: beta, named at each point
                ax.annotate(f"β={beta:g}", (x, y), xytext=(4, -10), textcoords="offset points", fontsize=6,
                            color=s["color"])
        elif s["kind"] == "seeds":
            ax.scatter(s["x"], s["y"], s=9, alpha=0.3, color=s["color"], linewidths=0)
        elif s["kind"] == "reference":
            ax.plot(s["x"], s["y"], "k*", ms=8, label=s["label"])
        else:
            ax.plot(s["x"], s["y"], "k--", lw=1.2, label=s["label"])
    kl_max = study.kl_max
    ax.set_xlim(min(0.0, min(r["kl"] for r in study.runs)) - 0.02 * (kl_max + 0.01), kl_max * 1.12 + 0.01)
    ax.set_xlabel("KL(policy || reference) [nats per response]")
    ax.set_ylabel(TITLES[key].format(n=n) + " vs reference")
    ax.set_title(TITLES[key].format(n=n))
    ax.grid(alpha=0.3)


def study_figure(study: Study, key: str, ns=None):
    """A matplotlib figure for `key` (bon, won: one panel per N > 1; std: one panel), its legend outside the
    panels (inside, it hid points)."""
    import matplotlib.pyplot as plt

    ns = [1] if key == "std" else [n for n in (ns or study.ns) if n > 1] or [1]
    entries = len(_curves(study)) + 2  # the legend's: the curves, the reference, the optimum
    ncols = min(entries, 2 * len(ns))
    fig, axes = plt.subplots(1, len(ns), figsize=(max(4.6 * len(ns) + 0.6, 6.4), 4.2 + 0.2 * math.ceil(entries / ncols)),
                             squeeze=False, layout="constrained")
    for ax, n in zip(axes[0], ns):
        plot_metric(ax, study, key, n)
    handles = {}  # every panel's entries once (a curve may have no point in the first panel)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside lower center", ncols=ncols)
    fig.suptitle(f"{study.sweep_dir.name}: each point one beta, mean ± s.e. over seeds\n"
                 "(a point with one seed: that run's own s.e. over the eval prompts)", fontsize=9)
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
