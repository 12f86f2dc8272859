"""The run's log file (`<run>/train.log`): written only once the command runs in its directory.

Hydra's default job logging opens `train.log` with `logging.FileHandler` as the job starts, before the project
has looked at the run directory: a command that is then refused (a run already there, a busy directory, a
finished run with nothing to do) would still append to it. `HeldFileHandler`
(`conf/hydra/job_logging/infalign.yaml`, selected in `conf/train.yaml`) holds its records in memory until
`open_run_logs()` (called by `infalign.runtime.run_dir.accept_run`), then writes them and what follows; a refused
command's records never reach the file (tests/test_run_dir.py::
test_a_refused_or_idle_command_changes_no_file_in_the_run compares train.log byte for byte). Hydra's `.hydra/*.yaml` files are
written by `accept_run` too, atomically (conf/train.yaml sets `hydra.output_subdir: null`).
"""

from __future__ import annotations

import logging

__all__ = ["HeldFileHandler", "open_run_logs"]


class HeldFileHandler(logging.FileHandler):
    """`logging.FileHandler` that opens and writes nothing until `start_writing()`; records before it are held, in
    order (see the module docstring)."""

    def __init__(self, filename, mode: str = "a", encoding: str | None = None, delay: bool = True,
                 errors: str | None = None):
        super().__init__(filename, mode=mode, encoding=encoding, delay=True, errors=errors)  # opened once writing starts
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
