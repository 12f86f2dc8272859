"""Studies: a sweep of methods x beta x seeds read as win-rate-vs-KL curves with error bars, compared with
the closed-form theory (infalign.theory). No Lightning: it reads the runs' final_metrics.json.

    runs.py      reading a sweep's runs as data (final metrics, logs, the transform each trained with)
    analysis.py  the study computed from them: theory, gaps, mean ± s.e. over seeds, matched KL
    paired.py    paired per-prompt differences between methods, their s.e., the closed forms' prediction
    figures.py, report.py   the study's figures and tables, written into the sweep directory
    sweep.py     the Hydra end-of-multirun callback: the raw sweep summary, then the study

    python -m infalign.study <sweep dir>     (also run by the sweep callback at the end of every multirun)
"""

from infalign.study.analysis import (
    Study,
    aggregate,
    analyze_sweep,
    matched_kl,
    optimum_at,
    optimum_curve,
    run_rows,
    theory_at_kl,
)
from infalign.study.figures import plot_metric, study_figure, write_figures
from infalign.study.report import markdown, write_study
from infalign.study.runs import collect_runs, transform_from_run

__all__ = [
    "Study",
    "aggregate",
    "analyze_sweep",
    "collect_runs",
    "markdown",
    "matched_kl",
    "optimum_at",
    "optimum_curve",
    "plot_metric",
    "run_rows",
    "study_figure",
    "theory_at_kl",
    "transform_from_run",
    "write_figures",
    "write_study",
]
