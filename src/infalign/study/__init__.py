"""Studies: a sweep of methods x beta x seeds read as win-rate-vs-KL curves with error bars, compared with
the closed-form theory (infalign.theory). No Lightning: it reads the runs' files (docs/development.md, Layout).

    python -m infalign.study <sweep dir>     (also run by the sweep callback at the end of every multirun)
"""

import importlib

# Imported on first use (PEP 562): train.py instantiates the sweep callback (infalign.study.sweep) at Hydra's
# start-up, before the config is checked, and the analysis imports torch (~2 s) that a refused config never needs.
_EXPORTS = {
    "analysis": ("Study", "analyze_sweep", "matched_kl", "optimum_at", "optimum_curve", "run_rows",
                 "theory_at_kl"),
    "figures": ("plot_metric", "study_figure", "write_figures"),
    "report": ("markdown", "write_study"),
    "runs": ("collect_runs",),
    "seed_means": ("aggregate",),
    "run_config": ("transform_from_run",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"infalign.study.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'infalign.study' has no attribute {name!r}")
