"""Studies: a sweep of methods x beta x seeds read as win-rate-vs-KL curves with error bars, compared with
the closed-form theory (infalign.theory). No Lightning: it reads the runs' final_metrics.json.

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
from infalign.study.recorded import transform_from_run
from infalign.study.report import markdown, write_study

__all__ = [
    "Study",
    "aggregate",
    "analyze_sweep",
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
