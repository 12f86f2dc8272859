"""The run's log file (`<run>/train.log`), written without ever following a symbolic link planted in the run dir.

Hydra's default job logging opens `train.log` with `logging.FileHandler`, i.e. `open(path, "a")`: a link planted
at that name makes every run append its log to the link's target (any file its user may write). Then Hydra
writes `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` with `open(path, "w")`, which truncates a link's
target. `conf/hydra/job_logging/infalign.yaml` (selected in `conf/train.yaml`) uses `NoFollowFileHandler`
instead: it opens the log with `O_NOFOLLOW` (`infalign.runtime.atomic.open_no_follow`), replacing a link by a
plain file, and, as Hydra configures logging just before it saves those three files (hydra 1.3
`core.utils.run_job`), first removes links planted at their names. Each replaced link is reported on stderr
(logging is not set up yet at that moment); the link's target is never touched.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from infalign.runtime.atomic import open_no_follow

__all__ = ["HYDRA_FILES", "NoFollowFileHandler", "remove_planted_links"]

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes into <run>/.hydra at each start


def _report(path: Path, target: str) -> None:
    print(f"infalign: {path} was a symbolic link (to {target}); replaced it by a plain file, its target is untouched",
          file=sys.stderr, flush=True)


def remove_planted_links(hydra_dir: str | Path) -> list[Path]:
    """Remove a symbolic link at `hydra_dir` itself or at one of `HYDRA_FILES` in it (the links, not their
    targets), so that Hydra's `open(..., "w")` creates plain files; returns the links removed."""
    hydra_dir = Path(hydra_dir)
    found = [hydra_dir] if hydra_dir.is_symlink() else [hydra_dir / n for n in HYDRA_FILES
                                                         if (hydra_dir / n).is_symlink()]
    for link in found:
        target = os.readlink(link)
        link.unlink()
        _report(link, target)
    return found


class NoFollowFileHandler(logging.FileHandler):
    """`logging.FileHandler` that never writes through a symbolic link at `filename` (nor at Hydra's files in
    `hydra_dir`, when given): see the module docstring."""

    def __init__(self, filename, mode: str = "a", encoding: str | None = None, delay: bool = False,
                 errors: str | None = None, hydra_dir: str | None = None):
        if hydra_dir:
            remove_planted_links(hydra_dir)
        super().__init__(filename, mode=mode, encoding=encoding, delay=delay, errors=errors)

    def _open(self):
        return open_no_follow(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                              on_link=_report)
