"""End-of-multirun summary: one row per run and win rate vs KL with the theory curves overlaid.

A Hydra callback (`hydra.callbacks.sweep_summary` in conf/train.yaml): when a multirun ends it writes
`sweep_summary.csv` (every key of every member's final_metrics.json, verbatim) and `sweep_summary.png` (each run's
point ± its s.e. against the optimal-policy curve of its own transform over beta), then the study tables and figures
(`infalign.study.report`). The summary needs no analysis, so it is written first and stays when the study fails (a
member without eval/kl, a refused config). `python -m infalign.study.sweep <sweep dir>` rebuilds the summary,
`python -m infalign.study <sweep dir>` the study.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# numpy, the study and the theory (which import torch) are imported where they are used: Hydra instantiates
# SweepSummaryCallback at the start of every `python train.py`, before the config is checked (train.py).

log = logging.getLogger(__name__)

__all__ = ["SweepSummaryCallback", "summary_series", "write_summary"]


def _theory_curves(sweep_dir: Path, rows: list[dict]) -> tuple[dict, list]:
    """(curves, keys): (transform label, n) -> [(kl, bon, won)] of the optimal policy over a beta grid, for each
    member's transform seen through its M-sample calibration; and for each row the key of its own curve (None:
    none). The transform is rebuilt as data (infalign.study.run_config: nothing executed); a member whose config
    is refused is logged and gets no curve, its measured points still show."""
    import numpy as np

    from infalign.study.run_config import transform_from_run, yardstick_m
    from infalign.study.runs import RUN_CONFIG
    from infalign.theory import at_m, tilted_density

    curves, keys, betas = {}, [], np.geomspace(0.005, 5.0, 30)
    for row in rows:
        keys.append(None)
        name, n = row.get("transform"), int(row["n"])
        member_dir = sweep_dir / row["member"]
        if name in ("raw", "optimal") or not (member_dir / RUN_CONFIG).exists():
            continue  # raw rewards have no model-agnostic curve; optimal is beta-specific
        try:
            transform = transform_from_run(row, member_dir)
        except ValueError as e:
            log.warning("member %s: no theory curve: %s", row["member"], e)
            continue
        if transform is None:
            continue
        m = yardstick_m(row, member_dir)  # distill: the pool's M - 1 (issue 30 item 1)
        label = f"{name}(t={transform.t:.3g})" if hasattr(transform, "t") else name
        label += f", M={m}" if m else ""
        keys[-1] = (label, n)
        if (label, n) in curves:
            continue
        phi = at_m(transform, m)  # beta grids: the smooth form is enough
        pts = []
        for b in betas:
            d = tilted_density(phi, float(b))
            pts.append((d.kl(), d.bon_win_rate(n), d.won_win_rate(n)))
        curves[(label, n)] = pts
    return curves, keys


MARKERS, LINESTYLES = "osD^v<>ph*", ("-", "--", "-.", ":")


def summary_series(sweep_dir: Path, rows: list[dict]) -> dict[str, list[dict]]:
    """What sweep_summary.png draws, as data: {"bon": series, "won": series}, each in legend order (`kind`):

    - "runs": the runs of one (method, N, beta): label, color, marker, x (KL), y (the win rate at the run's own
      N), yerr (each run's recorded s.e. over the eval prompts), method, n, beta;
    - "theory": the optimal-policy curve of one transform (its t, M) at N over a beta grid: label, color,
      linestyle, x, y, method, n, betas (of the runs it is the theory for), curve (its `_theory_curves` key).

    Colour is keyed by (method, N): a run's points and the theory line of its own transform share one. Within it
    markers tell betas apart and line styles the curves (an exp transform's t depends on beta: near-identical
    curves for two betas); each label names method, N and beta(s). A curve follows the first run it belongs to."""
    curves, keys = _theory_curves(sweep_dir, rows)
    method_of = [r.get("method") or r.get("transform") for r in rows]
    out = {"bon": [], "won": []}
    for gi, (method, n) in enumerate(sorted({(m, int(r["n"])) for m, r in zip(method_of, rows)})):
        color = f"C{gi % 10}"
        group = [(r, k) for m, r, k in zip(method_of, rows, keys) if (m, int(r["n"])) == (method, n)]
        betas = sorted({float(r["beta"]) for r, _ in group})
        own = list(dict.fromkeys(k for _, k in group if k is not None))  # this group's curves, in sweep order
        for bi, beta in enumerate(betas):
            runs = [r for r, _ in group if float(r["beta"]) == beta]
            for mode in out:
                col = f"eval/{mode}_win_rate@{n}"
                pts = [r for r in runs if col in r and "eval/kl" in r]  # the summary outlives a bad member
                out[mode].append({"kind": "runs", "label": f"{method} N={n} β={beta:g}", "color": color,
                                  "marker": MARKERS[bi % len(MARKERS)], "method": method, "n": n, "beta": beta,
                                  "x": [r["eval/kl"] for r in pts], "y": [r[col] for r in pts],
                                  "yerr": [r.get(f"{col}_se", float("nan")) for r in pts]})
            for key in own:
                curve_betas = [b for b in betas if any(k == key and float(r["beta"]) == b for r, k in group)]
                if curve_betas[0] != beta:
                    continue  # drawn once, after the first beta it is the theory for
                for mode, idx in (("bon", 1), ("won", 2)):
                    out[mode].append({"kind": "theory", "color": color, "linestyle": LINESTYLES[own.index(key) % 4],
                                      "label": f"theory {key[0]} N={n} (β={', '.join(f'{b:g}' for b in curve_betas)})",
                                      "method": method, "n": n, "betas": curve_betas, "curve": key,
                                      "x": [p[0] for p in curves[key]], "y": [p[idx] for p in curves[key]]})
    return out


def write_summary(sweep_dir: Path) -> tuple[Path, Path] | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infalign.runtime.atomic import atomic_write_csv, atomic_write_figure
    from infalign.study.runs import collect_runs

    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir)
    if not rows:
        log.warning("no finished runs under %s: no sweep summary", sweep_dir)
        return None
    fields = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, png_path = sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.png"
    atomic_write_csv(csv_path, rows, fields)

    series = summary_series(sweep_dir, rows)
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.4), layout="constrained")
    for ax, (mode, label) in zip(axes, (("bon", "best-of-N"), ("won", "worst-of-N"))):
        handles = []  # in series order: each (method, N)'s points next to their theory lines
        for s in series[mode]:
            if s["kind"] == "theory":
                handles += ax.plot(s["x"], s["y"], s["linestyle"], color=s["color"], alpha=0.6, label=s["label"])
            else:
                handles.append(ax.errorbar(s["x"], s["y"], yerr=s["yerr"], fmt=s["marker"], color=s["color"],
                                           label=s["label"], capsize=3))
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("KL(policy || reference) [nats]")
        ax.set_ylabel(f"{label} win rate vs reference (N: each run's own)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{label}: runs (points ± s.e. over prompts) and theory (lines)", fontsize=10)
    # the same entries in both panels: one legend, outside them (inside, it hid points)
    fig.legend(handles=handles, fontsize=7, loc="outside right upper", ncols=1 + len(handles) // 28)
    try:
        atomic_write_figure(png_path, fig, dpi=110)
    finally:
        plt.close(fig)
    log.info("sweep summary: %s, %s", csv_path, png_path)
    return csv_path, png_path


class SweepSummaryCallback(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from infalign.study.report import write_study

        sweep_dir = Path(config.hydra.sweep.dir)
        if write_summary(sweep_dir) is None:
            return  # no finished runs (already logged)
        # The study (infalign.study): mean ± SE over seeds per method x beta, gaps to theory, matched KL, figures.
        # Its failure must not hide the finished runs: log it with the command that redoes it.
        try:
            write_study(sweep_dir, OmegaConf.select(config, "study.matched_kl", default=None))
        except Exception:
            log.exception("study tables failed; rerun with: python -m infalign.study %s", sweep_dir)


if __name__ == "__main__":
    from infalign.study.cli import cli_parser
    from infalign.study.runs import sweep_problem

    parser = cli_parser("python -m infalign.study.sweep", "Rebuild a sweep's sweep_summary.csv and sweep_summary.png "
                        "(what the sweep callback writes when a multirun ends).")
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (hydra.sweep.dir of `train.py -m`)")
    sweep_dir = parser.parse_args().sweep_dir  # exits 2 with a usage line on bad input
    if problem := sweep_problem(sweep_dir):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    written = write_summary(sweep_dir)
    if written is None:  # every finished member skipped as damaged: each was named in a warning
        sys.exit(2)
    print(*written, sep="\n")
