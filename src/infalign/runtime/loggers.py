"""The run's loggers: the local CSV log, always, and an optional remote one (W&B) that may never stop training.

`build_loggers` gives Lightning's `CSVLogger` with two of its writer's steps replaced (`_CSVWriter`: a resumed
run appends, a new column rewrites the file atomically) and the configured remote logger inside `GuardedLogger`,
named, grouped and tagged by `infalign.runtime.identity.run_identity`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partialmethod
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from infalign.runtime.atomic import atomic_write_csv, read_csv_rows, write_errors
from infalign.runtime.identity import with_identity

log = logging.getLogger(__name__)

__all__ = ["GuardedLogger", "ResumableCSVLogger", "WandbLogger", "build_loggers", "finish_loggers"]

LOCAL_FILES = "logs/metrics.csv, eval_metrics.csv, final_metrics.json"


class _CSVWriter(ExperimentWriter):
    """Lightning's CSV writer (2.6) with two of its private steps replaced; `keep_existing`: a resumed run's."""

    def __init__(self, log_dir: str, keep_existing: bool):
        self.keep_existing = keep_existing
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here, and a resumed run would lose the rows of the run it
        # continues (tests/test_faults.py::test_sigterm_and_sigint_stop_at_an_iteration_boundary_with_a_checkpoint,
        # tests/test_reliability.py::test_csv_logger_keeps_earlier_rows_on_resume_and_adds_columns_atomically)
        if not self.keep_existing:
            return super()._check_log_dir_exists()
        self.metrics_keys = read_csv_rows(self.metrics_file_path)[0]  # append under the header already there

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place when a column appears (a run's first evaluation): a full disk or a
        # kill mid-rewrite would lose every earlier row (tests/test_file_errors.py, "file size limit reached while
        # logs/metrics.csv gains a column")
        atomic_write_csv(self.metrics_file_path, read_csv_rows(self.metrics_file_path)[1], fieldnames)

    def save(self) -> None:
        # Lightning appends the buffered rows with a plain write: a full disk would end the run in a traceback
        # (tests/test_file_errors.py, "full disk appending rows to logs/metrics.csv"); the one-line error names the
        # file and the fix, and a resume trims a half-written row (infalign.trainer.checkpointing)
        with write_errors(self.metrics_file_path, fix="start again with hydra.run.dir on another disk; this run "
                          "continues with resume=true once there is room"):
            super().save()


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, writing through `_CSVWriter`; `keep_existing=True` for a resumed run."""

    def __init__(self, *args, keep_existing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_existing = keep_existing

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:  # Lightning's property, with the writer above
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _CSVWriter(self.log_dir, self.keep_existing)
        return self._experiment


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger`, without the `anonymous=None` Lightning 2.6 always hands to `wandb.init`: None was
    the default in every wandb release that had the setting, and wandb >= 0.23.1 warns that it "has no effect"
    whenever it is passed (tests/test_wandb.py::test_an_offline_wandb_sweep_is_grouped_named_and_shows_samples)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous", False) is None:
            del self._wandb_init["anonymous"]


class GuardedLogger(Logger):
    """Delegates to `logger`; the first exception it raises is reported once and switches it off. Lightning has no
    such guard: a remote logger's exception stops training (tests/test_faults.py::
    test_logger_failing_mid_run_costs_no_metrics_and_warns_once)."""

    def __init__(self, logger: Logger, label: str | None = None):
        super().__init__()
        self.logger, self.label = logger, label or type(logger).__name__
        self.error: BaseException | None = None

    def fail(self, error: BaseException, what: str) -> None:
        self.error = error
        log.warning("logger %s failed in %s (%s: %s); it is switched off for the rest of this run. Training goes "
                    "on, and the local files (%s) stay complete.", self.label, what, type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "", LOCAL_FILES)

    def _get(self, attr: str) -> Any:
        """`logger.<attr>`; None once switched off, or where the logger has no `attr`."""
        if self.error is None:
            try:
                return getattr(self.logger, attr, None)
            except Exception as e:  # noqa: BLE001 - any failure of an optional logger
                self.fail(e, attr)
        return None

    def _call(self, what: str, *args, **kwargs) -> Any:
        method = self._get(what)
        if method is not None:
            try:
                return method(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self.fail(e, what)
        return None

    @property
    def name(self) -> str:
        return self.label

    @property
    def version(self) -> int | str | None:
        return self._get("version")

    @property
    def experiment(self) -> Any:  # read by Lightning at setup: where W&B starts its run
        return self._get("experiment")

    # Lightning's logger hooks, and W&B's `log_table` (nothing for a logger without one)
    log_metrics = partialmethod(_call, "log_metrics")
    log_hyperparams = partialmethod(_call, "log_hyperparams")
    log_graph = partialmethod(_call, "log_graph")
    save = partialmethod(_call, "save")
    finalize = partialmethod(_call, "finalize")
    after_save_checkpoint = partialmethod(_call, "after_save_checkpoint")
    log_table = partialmethod(_call, "log_table")


def build_loggers(logger_cfg, run_dir: Path, resuming: bool = False, identity: Mapping | None = None) -> list[Logger]:
    """`[CSV logger, guarded remote logger (if configured and it could be created)]`; `identity` (`run_identity`):
    the remote run's name, group and tags."""
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=run_dir, name="logs", version="", keep_existing=resuming)]
    if logger_cfg and logger_cfg.get("_target_"):
        target = logger_cfg.get("_target_")
        try:
            loggers.append(GuardedLogger(instantiate(with_identity(logger_cfg, identity)),
                                         label=target.rsplit(".", 1)[-1]))
        except Exception as e:  # noqa: BLE001 - e.g. wandb not installed
            cause = e.__cause__ or e
            log.warning("logger %s could not be created (%s: %s); running without it. The local files (%s) are "
                        "written as always.", target, type(cause).__name__, str(cause).splitlines()[0] if str(cause)
                        else "", LOCAL_FILES)
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """End the W&B run between multirun members: Lightning's `WandbLogger.finalize` leaves it open, and the next
    member's `WandbLogger` would log into it (tests/test_wandb.py::
    test_an_offline_wandb_sweep_is_grouped_named_and_shows_samples)."""
    for lg in loggers:
        if isinstance(lg, GuardedLogger) and isinstance(lg.logger, LightningWandbLogger):
            try:
                import wandb

                wandb.finish()  # also after a failure: a run may be open
            except Exception as e:  # noqa: BLE001
                if lg.error is None:  # reported once: a logger that already failed stays quiet
                    lg.fail(e, "finish")
