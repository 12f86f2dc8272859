"""The run's log file (`<run>/train.log`), written only once the command runs in its directory.

Hydra's job logging opens `train.log` as the job starts, before the run directory is checked: a refused command
(a run already there, a busy directory, nothing to do) would still append to it. `HeldFileHandler`
(conf/hydra/job_logging/infalign.yaml) holds its records in memory until `open_run_logs()` (called by
`infalign.runtime.run_dir.accept_run`); a refused command's never reach the file (tests/test_run_dir.py::
test_a_refused_or_idle_command_changes_no_file_in_the_run).
"""

from __future__ import annotations

import logging

__all__ = ["HeldFileHandler", "open_run_logs"]


class HeldFileHandler(logging.FileHandler):
    """`logging.FileHandler` that opens and writes nothing until `start_writing()`; records before it are held, in
    order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "delay": True})  # the file is opened once writing starts
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def start_writing(self) -> None:  # not `release`: logging.Handler.release unlocks the handler
        held, self._held = self._held or [], None
        for record in held:
            super().emit(record)


def open_run_logs() -> None:
    """The command runs: every held log file (on the root logger) writes its records from now on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HeldFileHandler):
            handler.start_writing()
