"""A stop signal (SIGINT, SIGTERM) at any stage of a run: say what was stopped, keep nothing half-built.

During RL training `infalign.trainer.checkpointing.LastCheckpoint` takes the signals over (it finishes the
iteration, saves `last.ckpt` and stops). Before and after training there is nothing to save, and Python's own
handling says nothing useful (SIGTERM kills on the spot, printing nothing and cleaning nothing up; SIGINT ends in a
traceback). Inside `stop_on_signals` the first signal raises `StoppedBySignal` where the main thread is, so every
build unwinds through its own cleanup, and the caller prints what was stopped (`stage`, `progress`) and what to run
next. A second signal kills the process at once, as the default action would.

Python prints and drops an exception raised in a `__del__` ("Exception ignored in ..."), and the garbage collector
runs finalizers at any allocation: a signal that lands in one is sent again 50 ms later, and a stop not yet raised
is raised at the next stage boundary or progress step. Stdlib only: the cache and the data reader mark stages too.
"""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STOP_SIGNALS", "StoppedBySignal", "current_stage", "progress", "relabel", "stage", "stop_on_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BASE_STAGE = "starting the run"  # what runs outside any marked stage: config checks, Lightning's set-up

_stages: list[list[str]] = []  # [label, progress] of each stage entered and not yet left, innermost last
_stop: dict = {"pending": None, "resent": False}  # the stop of the current stop_on_signals block


class StoppedBySignal(BaseException):
    """A stop signal arrived during `stage`. A BaseException, as KeyboardInterrupt is: the `except Exception`
    around optional steps (a remote logger, the efficiency theory) must not swallow it."""

    def __init__(self, signum: int, stage: str):
        self.signum, self.stage = int(signum), stage
        super().__init__(f"stopped by {signal.Signals(signum).name} while {stage}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "terminated by signal N"


@contextmanager
def stage(label: str) -> Iterator[None]:
    """Mark what the process is doing (`"building the calibration cache"`), for the message of a stop."""
    _raise_pending()
    entry = [label, ""]
    _stages.append(entry)
    try:
        yield
    finally:  # by identity: list.remove compares by value, and two stages may carry the same label
        _stages[:] = [s for s in _stages if s is not entry]


def progress(text: str) -> None:
    """How far the innermost stage has got (`"24/96 prompts"`)."""
    _raise_pending()
    if _stages:
        _stages[-1][1] = text


def relabel(label: str) -> None:
    """Rename the innermost stage: the phases of one long call (training, then writing its results)."""
    if _stages:
        _stages[-1][:] = [label, ""]


def _raise_pending() -> None:
    if _stop["pending"] is not None:
        raise _stop["pending"]


def _in_finalizer(frame) -> bool:
    return any(f.f_code.co_name == "__del__" for f, _ in traceback.walk_stack(frame))


def current_stage() -> str:
    if not _stages:
        return BASE_STAGE
    label, done = _stages[-1]
    return f"{label} ({done})" if done else label


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block the first of `STOP_SIGNALS` raises `StoppedBySignal` (naming the current stage); a second one
    kills the process at once. The previous handlers come back on exit. Off the main thread (where Python allows
    no handler) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _stop["pending"] is not None and not _stop["resent"]:  # the second: the user means it, no cleanup
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _stop["resent"] = False
        if _stop["pending"] is None:
            _stop["pending"] = StoppedBySignal(signum, current_stage())
        if _in_finalizer(frame):  # raised here it would be dropped: once out of the finalizer, again
            _stop["resent"] = True
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        raise _stop["pending"]

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    _stop.update(pending=None, resent=False)
    try:
        with stage(BASE_STAGE):
            yield
    finally:
        _stop.update(pending=None, resent=False)
        for s, old in previous.items():
            signal.signal(s, old)
