"""When a run's state is saved, and how a run stops on a signal (how it continues: `infalign.trainer.resume`).

`LastCheckpoint` keeps `checkpoints/last.ckpt` current between RL iterations: every `checkpoint.every`
iterations, at the end of training (after the final evaluation, which it holds), and at the end of the iteration
in which SIGINT or SIGTERM arrived, after which the run stops (exit status 128 + signal number, with the command
that resumes). At any other stage `exit_on_stop_signal` stops the run at once (nothing half-built is kept).

Kept instead of Lightning's own machinery (2.6.6), which loses training (both re-measured 2026-12-07):
- `ModelCheckpoint(save_top_k=0, save_last=True, every_n_epochs=...)` writes `last.ckpt` at an epoch's end only when
  a top-k checkpoint was written at the same step, never with `save_top_k=0`: the first one is written at the end
  of training, so tests/test_faults.py::test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run fails
  ("the run finished before the kill": a killed run lost everything).
- On SIGTERM Lightning raises `SIGTERMException` (a `SystemExit`, status 0) after the current batch and on SIGINT
  exits with status 1, neither saving; without our handlers the stop lands mid-iteration and the last periodic
  checkpoint is all there is: tests/test_faults.py::test_sigterm_and_sigint_stop_at_an_iteration_boundary_with_a_checkpoint
  fails.

The local metric files stay in step with the checkpoint: it records their row counts, and a resume drops the rows
a dead run wrote after it (the resumed run writes them again): nothing lost, nothing counted twice.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from infalign.runtime import signals
from infalign.runtime.atomic import atomic_write_csv, atomic_write_text, read_csv_rows
from infalign.trainer.resume import LAST, RESUME_HISTORY, RUN_CONFIG, resume_command

log = logging.getLogger(__name__)

__all__ = ["LastCheckpoint", "TrainingInterrupted", "exit_on_stop_signal", "stopped_message", "truncate_csv",
           "METRIC_FILES"]

METRIC_FILES = ("logs/metrics.csv", "eval_metrics.csv")  # relative to the run directory


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path):
        self.signum, self.iteration, self.checkpoint = signum, iteration, Path(checkpoint)
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name} received: stopped after iteration {iteration}, "
                         f"state saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)  # the shell convention for "terminated by signal N"


def truncate_csv(path: Path, rows: int) -> int:
    """Keep the header and the first `rows` data rows of a CSV file (atomically); returns rows dropped."""
    header, data = read_csv_rows(path)
    if len(data) <= rows:
        return 0
    atomic_write_csv(path, data[:rows], header)
    return len(data) - rows


def write_run_config(run_dir: Path, record: dict, iteration: int) -> None:
    """`run_config.yaml`: `record` (`run_record`) as YAML, unless the run already has one (`iteration`: where
    this process started, for the header)."""
    path = run_dir / RUN_CONFIG
    if path.exists():
        return  # never overwritten: the config the run started with
    since = ("started with" if iteration == 0 else
             f"resumed with at iteration {iteration} (its checkpoint recorded no config before)")
    atomic_write_text(path, f"# The resolved config this run {since}; written once, never overwritten.\n"
                            f"# Resumes, and what each changed, are listed in {RESUME_HISTORY}.\n"
                            + OmegaConf.to_yaml(record))


def append_history(run_dir: Path, entry: dict) -> None:
    """One line (`ResumePlan.entry`) more in `resume_history.jsonl`, the whole file rewritten atomically."""
    path = run_dir / RESUME_HISTORY
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")


class LastCheckpoint(L.Callback):
    """`run_record` goes into every checkpoint (and `run_config.yaml`), `resume_entry` into `resume_history.jsonl`
    with a resumed run's first checkpoint. Placed after `WinRateCallback`, its final checkpoint holds the final
    evaluation."""

    def __init__(self, run_dir: str | Path, every: int, run_record: dict | None = None,
                 resume_entry: dict | None = None):
        self.run_dir, self.every = Path(run_dir), int(every)
        self.path = self.run_dir / "checkpoints" / LAST
        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self.run_record, self._resume_entry = run_record, resume_entry
        self._started_at = 0  # the iteration this process started from (the checkpoint's, on resume)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # the second one: the user means it
            raise KeyboardInterrupt
        self.stop_signal = signum
        # print, not log: logging from a signal handler can deadlock on the handler's lock
        print(f"\n{signal.Signals(signum).name} received: finishing the current iteration, then saving "
              f"{self.path} and stopping (send it again to abort without saving)", file=sys.stderr, flush=True)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; Lightning's defaults stay in force
        for s in signals.STOP_SIGNALS:
            self._previous_handlers[s] = signal.signal(s, self._on_signal)

    def _restore(self) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer, module) -> None:
        self.stop_signal = None
        signals.relabel("training")  # what a stop before our handlers are in would name (exit_on_stop_signal)
        self._install()  # after Lightning's own SIGTERM handler, which this replaces while training runs

    def on_exception(self, trainer, module, exception) -> None:
        self._restore()

    # ------------------------------------------------------------------ saving
    def on_train_epoch_end(self, trainer, module) -> None:
        iteration = trainer.current_epoch + 1
        # every process must take the same decision: save_checkpoint is collective under DDP
        stop = trainer.strategy.reduce_boolean_decision(self.stop_signal is not None, all=False)
        if stop or (self.every and iteration % self.every == 0):
            self.save(trainer)
        if stop:
            self._restore()
            raise TrainingInterrupted(self.stop_signal or signal.SIGTERM, iteration, self.path)

    def on_train_end(self, trainer, module) -> None:
        self._restore()
        # always, even right after an iteration's save: this one follows the final evaluation, so it holds its
        # result (WinRateCallback state) and metric rows; a resume from it finds the run finished
        self.save(trainer)
        signals.relabel("writing the results (policy/, final_metrics.json) after the final checkpoint")
        # it arrived during the final evaluation: stop as promised (every process decides alike, as above)
        if trainer.strategy.reduce_boolean_decision(self.stop_signal is not None, all=False):
            raise TrainingInterrupted(self.stop_signal or signal.SIGTERM, trainer.current_epoch, self.path)

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: optimizer, loops, callbacks

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:  # Lightning buffers CSV rows (flushes every 100 steps): write them now
            if isinstance(lg, CSVLogger):
                lg.save()
        checkpoint["metric_rows"] = {rel: len(read_csv_rows(self.run_dir / rel)[1]) for rel in METRIC_FILES}
        if self.run_record is not None:
            checkpoint["run_config"] = self.run_record  # plain data: loads with weights_only=True
            # the record first, then the checkpoint: a change in the saved state is never missing from it
            write_run_config(self.run_dir, self.run_record, self._started_at)
        if self._resume_entry is not None:
            append_history(self.run_dir, self._resume_entry)
            self._resume_entry = None

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        progress = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {})
        self._started_at = int((progress.get("current") or {}).get("processed", 0))
        if not trainer.is_global_zero:
            return
        for rel, rows in (checkpoint.get("metric_rows") or {}).items():
            dropped = truncate_csv(self.run_dir / rel, int(rows))
            if dropped:
                log.info("resume: dropped %d row(s) of %s written after the checkpoint", dropped, rel)


# ------------------------------------------------------------------ a stop at any other stage
def stopped_message(stop: signals.StoppedBySignal, run_dir: Path, task_overrides: list[str]) -> str:
    """What was stopped and the command that continues: from the last checkpoint when the run has one, else the
    same run again (resume=auto: a run directory left without a checkpoint is started afresh)."""
    last = Path(run_dir) / "checkpoints" / LAST
    if last.is_file():
        return (f"{stop}; the last checkpoint {last} is kept, nothing half-written was.\n"
                f"Continue it with:\n  {resume_command(task_overrides, run_dir)}")
    return (f"{stop}; nothing partial was kept (what was built before is cached, and reused).\n"
            f"Run the same command again to continue:\n  {resume_command(task_overrides, run_dir, resume='auto')}")


def exit_on_stop_signal(run):
    """Decorate the run (`infalign.trainer.run.run`): SIGINT or SIGTERM at any stage stops it, at once or during
    training at the end of the iteration (`LastCheckpoint`), prints what was stopped and what to run next, and
    exits with status 128 + the signal's number."""

    @functools.wraps(run)
    def wrapper(cfg, *args, **kwargs):
        from hydra.core.hydra_config import HydraConfig

        with signals.stop_on_signals():
            try:
                return run(cfg, *args, **kwargs)
            except (signals.StoppedBySignal, TrainingInterrupted) as stop:
                hydra = HydraConfig.get()
                run_dir, overrides = Path(hydra.runtime.output_dir), list(hydra.overrides.task)
                if isinstance(stop, TrainingInterrupted):  # the checkpoint of its last iteration is saved
                    message = f"{stop}.\nContinue it with:\n  {resume_command(overrides, run_dir)}"
                else:
                    message = stopped_message(stop, run_dir, overrides)
                    log.warning("%s", message.splitlines()[0])  # the run's log records it too
                print(f"\n{message}", file=sys.stderr, flush=True)
                raise SystemExit(stop.exit_code) from None

    return wrapper
