"""When a run's state is saved, and how a run continues after a crash, a kill or a stop signal.

`LastCheckpoint` keeps `checkpoints/last.ckpt` current at safe points only (between RL iterations): every
`checkpoint.every` iterations, at the end of training, and at the end of the iteration in which SIGINT or
SIGTERM arrived, after which it stops the run (exit status 128 + signal number, with the command that resumes).

Why not Lightning's own machinery:
- `ModelCheckpoint(save_top_k=0, save_last=True)` in Lightning 2.6 writes `last.ckpt` at an epoch's end only
  when a top-k checkpoint was written at the same step, which never happens with `save_top_k=0`: it saved
  only at the end of training, so a crashed run lost everything.
- On SIGTERM Lightning raises `SIGTERMException` (a `SystemExit` with status 0) right after the current batch,
  without a checkpoint; on SIGINT, `KeyboardInterrupt` lands wherever the process is (mid-generation) and
  Lightning exits with status 1, also without a checkpoint. We install our own handlers for the duration of
  training; a second signal aborts at once.

The local metric files stay in step with the checkpoint: before each save the CSV loggers are flushed and the
row counts of `logs/metrics.csv` and `eval_metrics.csv` go into the checkpoint; on resume, rows the dead run
wrote after its last checkpoint are dropped (the resumed run writes them again), so nothing is lost and
nothing is counted twice.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from infalign.atomic import atomic_write_csv, read_csv_rows, remove_stale_temps
from infalign.checkpoint_io import verify_checkpoint

log = logging.getLogger(__name__)

__all__ = ["LastCheckpoint", "TrainingInterrupted", "check_run_options", "resolve_resume", "resume_command",
           "LAST", "METRIC_FILES", "RUN_OUTPUTS"]

LAST = "last.ckpt"
METRIC_FILES = ("logs/metrics.csv", "eval_metrics.csv")  # relative to the run directory
RUN_OUTPUTS = ("checkpoints", "final_metrics.json", "eval_metrics.csv", "logs", "policy")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def check_run_options(cfg) -> None:
    """`resume`, `overwrite` and `checkpoint.every`: clear errors before anything is loaded."""
    if not (cfg.resume is True or cfg.resume is False or cfg.resume == "auto"):
        raise ValueError(f"resume must be true, false or auto, got {cfg.resume!r}")
    if not isinstance(cfg.overwrite, bool):
        raise ValueError(f"overwrite must be true or false, got {cfg.overwrite!r}")
    if cfg.resume is not False and cfg.overwrite:
        raise ValueError("resume and overwrite=true contradict each other: resume continues the run in "
                         "hydra.run.dir, overwrite replaces it; pass one of them")
    every = cfg.checkpoint.every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"checkpoint.every must be an integer >= 0 (0: only at the end and on a stop signal), "
                         f"got {every!r}")


def _existing_outputs(run_dir: Path) -> list[str]:
    found = []
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _clear_outputs(run_dir: Path, names: list[str]) -> None:
    for name in names:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


# set by Lightning's launcher in the processes it starts, and by torchrun / srun / jsrun in every process
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_first_process() -> bool:
    """True unless the environment marks this as a non-zero rank of a distributed run (no process group yet)."""
    return all(os.environ.get(k, "0") in ("", "0") for k in _RANK_VARIABLES)


def resolve_resume(run_dir: Path, resume, overwrite: bool) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; never clobbers another run silently.

    resume=true needs `checkpoints/last.ckpt`; resume=auto continues from it when there is one and starts
    afresh otherwise (what a pre-emptible job's restart loop wants); a checkpoint that fails verification is
    refused in both cases rather than silently ignored. A fresh start in a directory that holds a run's
    outputs is refused unless overwrite=true, which deletes them first. Only the first process of a
    distributed run judges and clears the directory: the others start when it has already begun writing there.
    """
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / LAST
    if not is_first_process():
        return last if resume is not False and last.exists() else None
    remove_stale_temps(last.parent)  # what a kill during a checkpoint write leaves behind
    if resume is True and not last.exists():
        raise FileNotFoundError(f"resume=true but {last} does not exist: point hydra.run.dir at the run to "
                                "continue, or pass resume=auto to start afresh when there is no checkpoint")
    if resume is not False and last.exists():
        verify_checkpoint(last)  # before any model is built: a bad checkpoint fails in seconds
        log.info("resuming from %s", last)
        return last
    existing = _existing_outputs(run_dir)
    if resume == "auto" and existing and not {"final_metrics.json", "policy"} & set(existing):
        log.warning("resume=auto: %s holds no checkpoint yet; starting afresh (clearing %s)", run_dir, existing)
        _clear_outputs(run_dir, existing)
    elif existing:
        if not overwrite:
            raise FileExistsError(f"{run_dir} already holds a run's outputs ({', '.join(existing)}): pass resume=true "
                                  "(or resume=auto) to continue it, overwrite=true to replace it, or choose another "
                                  "hydra.run.dir")
        log.warning("overwrite=true: deleting %s in %s", existing, run_dir)
        _clear_outputs(run_dir, existing)
    return None


def resume_command(task_overrides: list[str], run_dir: Path) -> str:
    """The command line that continues this run: its own overrides, its directory, resume=true."""
    drop = ("resume=", "overwrite=", "hydra.run.dir=", "+resume=")
    kept = [o for o in task_overrides if not o.startswith(drop)]
    args = [*kept, f"hydra.run.dir={run_dir}", "resume=true"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


def _count_rows(path: Path) -> int:
    return len(read_csv_rows(path)[1])


def truncate_csv(path: Path, rows: int) -> int:
    """Keep the header and the first `rows` data rows of a CSV file (atomically); returns rows dropped."""
    header, data = read_csv_rows(path)
    if len(data) <= rows:
        return 0
    atomic_write_csv(path, data[:rows], header)
    return len(data) - rows


class LastCheckpoint(L.Callback):
    def __init__(self, run_dir: str | Path, every: int, metric_files: tuple[str, ...] = METRIC_FILES):
        self.run_dir, self.every, self.metric_files = Path(run_dir), int(every), tuple(metric_files)
        self.path = self.run_dir / "checkpoints" / LAST
        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._saved_step: int | None = None

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
        for s in STOP_SIGNALS:
            self._previous_handlers[s] = signal.signal(s, self._on_signal)

    def _restore(self) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer, module) -> None:
        self.stop_signal = None
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
        if self._saved_step != trainer.global_step:
            self.save(trainer)

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: optimizer, loops, callbacks
        self._saved_step = trainer.global_step

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:  # Lightning buffers CSV rows (flushes every 100 steps): write them now
            if isinstance(lg, CSVLogger):
                lg.save()
        checkpoint["metric_rows"] = {rel: _count_rows(self.run_dir / rel) for rel in self.metric_files}

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if not trainer.is_global_zero:
            return
        for rel, rows in (checkpoint.get("metric_rows") or {}).items():
            dropped = truncate_csv(self.run_dir / rel, int(rows))
            if dropped:
                log.info("resume: dropped %d row(s) of %s written after the checkpoint", dropped, rel)
