"""The run's log file (`<run>/train.log`): opened only once the command runs there, never through a symbolic link.

Hydra's default job logging opens `train.log` with `logging.FileHandler` as the job starts, before the project
has looked at the run directory: a command that is then refused (a run already there, a busy directory, a
finished run with nothing to do) would still append to it. `NoFollowFileHandler`
(`conf/hydra/job_logging/infalign.yaml`, selected in `conf/train.yaml`) holds its records in memory until
`open_run_logs()` (called by `infalign.runtime.run_dir.accept_run`), then writes them and what follows; a refused
command's records never reach the file. It opens the log with `O_NOFOLLOW` (`infalign.runtime.atomic.open_no_follow`):
a link planted at that name (which a plain `open(path, "a")` would follow into any file its user may write) is
replaced by a plain file and reported on stderr; the link's target is never touched. Hydra's `.hydra/*.yaml`
files are written by `accept_run` too, atomically (conf/train.yaml sets `hydra.output_subdir: null`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from infalign.runtime.atomic import open_no_follow

__all__ = ["HYDRA_FILES", "NoFollowFileHandler", "open_run_logs", "remove_planted_links"]

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # Hydra's record of a command, in <run>/.hydra


def _report(path: Path, target: str) -> None:
    print(f"infalign: {path} was a symbolic link (to {target}); replaced it by a plain file, its target is untouched",
          file=sys.stderr, flush=True)


def remove_planted_links(hydra_dir: str | Path) -> list[Path]:
    """Remove a symbolic link at `hydra_dir` itself or at one of `HYDRA_FILES` in it (the links, not their
    targets), so that the files are written as plain files; returns the links removed."""
    hydra_dir = Path(hydra_dir)
    found = [hydra_dir] if hydra_dir.is_symlink() else [hydra_dir / n for n in HYDRA_FILES
                                                         if (hydra_dir / n).is_symlink()]
    for link in found:
        target = os.readlink(link)
        link.unlink()
        _report(link, target)
    return found


class NoFollowFileHandler(logging.FileHandler):
    """`logging.FileHandler` that writes nothing until `start_writing()` (records before it are held, in order) and
    never writes through a symbolic link at `filename`: see the module docstring."""

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

    def _open(self):
        return open_no_follow(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                              on_link=_report)


def open_run_logs() -> None:
    """The command runs: every held log file (on the root logger) writes its records from now on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, NoFollowFileHandler):
            handler.start_writing()
