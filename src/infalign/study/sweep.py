"""End-of-multirun summary: one row per run and win rate vs KL with the theory curves overlaid.

A Hydra callback (`hydra.callbacks.sweep_summary` in conf/train.yaml): when a multirun ends it reads
each member's `final_metrics.json` (`infalign.study.runs`) and writes `sweep_summary.csv` and
`sweep_summary.png` into the sweep directory, then the study tables and figures (`infalign.study.report`:
study_results.md, ...). `python -m infalign.study.sweep <sweep dir>` rebuilds the summary,
`python -m infalign.study <sweep dir>` the study.

The two overlap (one row per run, win rate vs KL) but answer different questions, so both are written:

- the summary is the sweep's raw record: `sweep_summary.csv` is every key of every member's
  final_metrics.json, verbatim (calibration cache, timings, every eval metric, whatever the run recorded),
  and `sweep_summary.png` every run's own point against the optimal-policy curve of its own transform over
  beta (none for raw and optimal). It needs no analysis, so it is written for any multirun, first, and stays
  when the study fails (a member without eval/kl, a refused config);
- the study (`study_*.csv`, `.md`, `.png`) is the analysis: selected, renamed columns, theory and optimum at
  each run's measured KL, gaps, mean ± s.e. over seeds per method x beta, matched KL, and curves against the
  best any policy can reach.
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

__all__ = ["SweepSummaryCallback", "write_summary"]


def _theory_curves(sweep_dir: Path, rows: list[dict]) -> dict[tuple[str, int], list[tuple[float, float, float]]]:
    """(transform, n) -> [(kl, bon, won)] of the optimal policy over a beta grid, from each member's config, for
    the transform seen through the member's M-sample calibration (`at_m`, infalign.theory.finite_m).

    The transform is rebuilt as data (infalign.study.runs: allow-listed transforms, the recorded t, nothing
    executed); a member whose config is refused is logged and gets no curve, its measured points still show."""
    import numpy as np

    from infalign.study.runs import RUN_CONFIG, calibration_m, transform_from_run
    from infalign.theory import tilted_density
    from infalign.theory.efficiency import calibrated_transform

    curves, betas = {}, np.geomspace(0.005, 5.0, 30)
    for row in rows:
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
        m = calibration_m(row, member_dir)
        label = f"{name}(t={transform.t:.3g})" if hasattr(transform, "t") else name
        label += f", M={m}" if m else ""
        if (label, n) in curves:
            continue
        phi = calibrated_transform(transform, m)
        pts = []
        for b in betas:
            d = tilted_density(phi, float(b))
            pts.append((d.kl(), d.bon_win_rate(n), d.won_win_rate(n)))
        curves[(label, n)] = pts
    return curves


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

    curves = _theory_curves(sweep_dir, rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (mode, label, idx) in zip(axes, (("bon", "best-of-N", 1), ("won", "worst-of-N", 2))):
        for i, ((name, n), pts) in enumerate(sorted(curves.items())):
            ax.plot([p[0] for p in pts], [p[idx] for p in pts], color=f"C{i}", alpha=0.5, label=f"theory {name} N={n}")
        groups = sorted({(r.get("transform"), int(r["n"])) for r in rows})
        for i, (name, n) in enumerate(groups):
            pts = [r for r in rows if r.get("transform") == name and int(r["n"]) == n and f"eval/{mode}_win_rate@{n}" in r]
            ax.errorbar([r["eval/kl"] for r in pts], [r[f"eval/{mode}_win_rate@{n}"] for r in pts],
                        yerr=[r[f"eval/{mode}_win_rate@{n}_se"] for r in pts], fmt="o", color=f"C{i}",
                        label=f"{name} N={n}", capsize=3)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("KL(policy || reference) [nats]")
        ax.set_ylabel(f"{label} win rate vs reference")
        ax.grid(alpha=0.3)
        ax.set_title(f"{label}: runs (points ± s.e.) and theory (lines)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
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
    from infalign.study.runs import sweep_problem

    if len(sys.argv) != 2:
        sys.exit("usage: python -m infalign.study.sweep <sweep dir>")
    if problem := sweep_problem(Path(sys.argv[1])):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    written = write_summary(Path(sys.argv[1]))
    if written is None:  # every finished member skipped as damaged: each was named in a warning
        sys.exit(2)
    print(*written, sep="\n")
