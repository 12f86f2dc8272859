"""The run's loggers: the local CSV log, always, plus an optional remote one (W&B) that may never stop training.

- `ResumableCSVLogger`: Lightning's CSV logger deletes an existing `metrics.csv` when it starts; on resume we
  keep it (the checkpoint's row count trims what the dead run wrote after its last checkpoint, see
  `infalign.trainer.checkpointing`), and the file is rewritten atomically when new columns appear. Rows are
  appended with `open_no_follow` and `hparams.yaml` written atomically: Lightning's `open(path, "a")` and
  `open(path, "w")` would write through a symbolic link planted in the run directory.
- `GuardedLogger`: wraps the configured remote logger. If it cannot be created (W&B not installed), cannot
  start (not logged in, no network) or fails mid-run, the failure is reported once as a warning, the logger is
  switched off, and training and the local files (logs/metrics.csv, eval_metrics.csv, final_metrics.json)
  carry on unaffected.
- `WandbLogger`: Lightning's W&B logger (conf/logger/wandb.yaml), minus the `anonymous=None` that Lightning
  always hands to `wandb.init`: wandb >= 0.23.1 removed anonymous mode and warns "The anonymous setting has no
  effect" whenever the argument is passed at all, even as None.
- `build_loggers`: the CSV logger and the guarded remote one, whose name, group and tags
  (`infalign.runtime.identity.run_identity`) it fills into the logger config's `name` / `group` (where null) and
  `tags` (added to the configured ones).
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from infalign.runtime.atomic import TMP_SUFFIX, atomic_write_csv, open_no_follow, read_csv_rows
from infalign.runtime.identity import with_identity

log = logging.getLogger(__name__)

__all__ = ["GuardedLogger", "ResumableCSVLogger", "WandbLogger", "build_loggers", "finish_loggers"]

LOCAL_FILES = "logs/metrics.csv, eval_metrics.csv, final_metrics.json"


class _CSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a resumed run appends under the existing header, a new column rewrites
    the file atomically, and no write follows a planted link. Kept because the stock writer (Lightning 2.6) deletes
    an existing metrics.csv when it starts and rewrites it in place on a new column, where a kill loses every
    earlier row; the promises are tested in tests/test_reliability.py::
    test_csv_logger_keeps_earlier_rows_on_resume_and_adds_columns_atomically and tests/test_file_errors.py
    ("symlink planted at logs/metrics.csv")."""

    keep_existing = False

    def _check_log_dir_exists(self) -> None:
        if not self.keep_existing:
            return super()._check_log_dir_exists()
        # resume: append to the rows already there, under their header
        self.metrics_keys = read_csv_rows(self.metrics_file_path)[0]

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place: a kill mid-rewrite would lose every earlier row
        atomic_write_csv(self.metrics_file_path, read_csv_rows(self.metrics_file_path)[1], fieldnames)

    def save(self) -> None:
        """Lightning's `save` (lightning 2.6 `ExperimentWriter.save`), appending through `open_no_follow`."""
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        exists = os.path.isfile(self.metrics_file_path) and not os.path.islink(self.metrics_file_path)
        if new_keys and exists:
            self._rewrite_with_new_header(self.metrics_keys)
        with open_no_follow(self.metrics_file_path, "a" if exists else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            if not exists:  # a fresh file (or a planted link replaced by one) starts with the header
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []

    def log_hparams(self, params: dict[str, Any]) -> None:
        """`hparams.yaml` written by Lightning into a fresh temporary name, then renamed over the old one."""
        self.hparams.update(params)
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        tmp = os.path.join(self.log_dir, f".{self.NAME_HPARAMS_FILE}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            save_hparams_to_yaml(tmp, self.hparams)
            os.replace(tmp, path)  # replaces a link at `path` itself, never its target
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


class _AppendingCSVWriter(_CSVWriter):
    keep_existing = True


class ResumableCSVLogger(CSVLogger):
    def __init__(self, *args, keep_existing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_existing = keep_existing

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer = _AppendingCSVWriter if self.keep_existing else _CSVWriter
            self._experiment = writer(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger`, without passing `anonymous` to `wandb.init` unless it was asked for.

    Lightning 2.6 puts `"anonymous": None` into the `wandb.init` arguments unconditionally. None was wandb's
    default (anonymous mode off) in every release that had the argument, so leaving it out changes nothing; and
    wandb >= 0.23.1, which dropped anonymous mode, then no longer warns that the setting has no effect. Offline
    mode (`mode: offline`) needs no account either way.
    """

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

    def _call(self, what: str, *args, **kwargs) -> Any:
        if self.error is not None:
            return None
        try:
            return getattr(self.logger, what)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of an optional logger
            self.fail(e, what)
            return None

    def fail(self, error: BaseException, what: str) -> None:
        self.error = error
        log.warning("logger %s failed in %s (%s: %s); it is switched off for the rest of this run. Training goes "
                    "on, and the local files (%s) stay complete.", self.label, what, type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "", LOCAL_FILES)

    def _get(self, attr: str, default=None):
        if self.error is not None or not hasattr(type(self.logger), attr):
            return default  # switched off, or a logger class without this (optional) attribute
        try:
            return getattr(self.logger, attr)
        except Exception as e:  # noqa: BLE001
            self.fail(e, attr)
            return default

    @property
    def name(self) -> str | None:
        return self._get("name", self.label)

    @property
    def version(self) -> int | str | None:
        return self._get("version")

    @property
    def save_dir(self) -> str | None:
        return self._get("save_dir")

    @property
    def root_dir(self) -> str | None:
        return self._get("root_dir")

    @property
    def log_dir(self) -> str | None:
        return self._get("log_dir")

    @property
    def experiment(self) -> Any:
        return self._get("experiment")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics, step=step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._call("log_hyperparams", params, *args, **kwargs)

    def log_graph(self, model, input_array=None) -> None:
        self._call("log_graph", model, input_array)

    def save(self) -> None:
        self._call("save")

    def finalize(self, status: str) -> None:
        self._call("finalize", status)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self._call("after_save_checkpoint", checkpoint_callback)

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        """A table (W&B: a `wandb.Table`), where the wrapped logger can log one; else nothing."""
        if hasattr(type(self.logger), "log_table"):
            self._call("log_table", key=key, columns=columns, data=data, step=step)


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
    """End the W&B run between multirun members, so one run's logger never swallows the next."""
    for lg in loggers:
        inner = lg.logger if isinstance(lg, GuardedLogger) else lg
        if not isinstance(inner, LightningWandbLogger):
            continue
        try:
            import wandb

            wandb.finish()
        except Exception as e:  # noqa: BLE001
            if not isinstance(lg, GuardedLogger):
                raise
            if lg.error is None:  # reported once: a logger that already failed stays quiet
                lg.fail(e, "finish")
