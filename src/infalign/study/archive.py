"""Keeping a study's results beside the code: copy each finished member's data files out of a sweep directory.

A sweep directory lives under `outputs/`, which is not committed, so a study run in parts loses its finished
members with the machine (issue 15 lost eight seeds per side that way). `archive_members` copies what the study
reads of each member (`ARCHIVED_FILES`, never checkpoints or samples) into a committed directory, one folder per
member, so the archive is itself a sweep directory (`python -m infalign.study <archive>`) and later parts join it.
Nothing is overwritten: a member already archived with other bytes is refused before anything is written (two
runs under one name are two results); `final_metrics.json` is written last, so an interrupted archive never
holds a member that looks finished without its tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from infalign.runtime.atomic import atomic_write_bytes
from infalign.study.runs import FINAL_METRICS, METRICS_LOG, PER_PROMPT, RUN_CONFIG, TILT_FIT, finished_members

log = logging.getLogger(__name__)

__all__ = ["ARCHIVED_FILES", "ArchiveConflictError", "ArchiveResult", "archive_members"]

# what infalign.study reads of a member (runs.py; the tilt fit, where it was run, tilt_fit.py); final_metrics.json
# last: it marks the member finished
ARCHIVED_FILES = (RUN_CONFIG, ".hydra/overrides.yaml", PER_PROMPT, METRICS_LOG, TILT_FIT, FINAL_METRICS)
SWEEP_FILES = ("multirun.yaml",)  # the sweep's saved config (study.matched_kl): kept from the first part archived


class ArchiveConflictError(FileExistsError):
    """An archived member's file differs from the one in the sweep being archived."""


@dataclass
class ArchiveResult:
    archived: list[str] = field(default_factory=list)  # members copied (new in the archive)
    unchanged: list[str] = field(default_factory=list)  # members already archived with the same bytes


def _plan(members: list[Path], dest: Path) -> tuple[list[tuple[str, list[tuple[Path, Path]]]], list[str]]:
    """Per member folder: the (source, target) pairs still to copy; and the conflicts found."""
    plan, conflicts = [], []
    for folder in members:
        member = folder.name
        copies = []
        for rel in ARCHIVED_FILES:
            src, dst = folder / rel, dest / member / rel
            if not src.is_file():
                continue
            if dst.exists():
                if dst.read_bytes() != src.read_bytes():
                    conflicts.append(str(dst))
                continue
            copies.append((src, dst))
        plan.append((member, copies))
    return plan, conflicts


def archive_members(sweep_dir: str | Path, dest: str | Path) -> ArchiveResult:
    """Copy every finished member of `sweep_dir` (a folder with `final_metrics.json`) into `dest/<member>/`.

    A damaged member (`infalign.study.runs.finished_members`: its final metrics or per-prompt table unreadable)
    is named in a warning and not archived: a committed archive holds only results the study can read.
    Raises FileNotFoundError if `sweep_dir` has no finished member it can read, ValueError if `dest` is
    `sweep_dir` or inside it, and ArchiveConflictError (naming every differing file) if a member is already
    archived with other contents, before any file is written."""
    sweep_dir, dest = Path(sweep_dir).resolve(), Path(dest).resolve()
    if dest == sweep_dir or sweep_dir in dest.parents:
        raise ValueError(f"archive directory {dest} is the sweep {sweep_dir} or inside it: archive into a directory "
                         "outside the sweep (e.g. docs/<study name>)")
    members = finished_members(sweep_dir)
    if not members:
        raise FileNotFoundError(f"{sweep_dir} has no finished member the study can read (<member>/final_metrics.json):"
                                " nothing to archive")
    plan, conflicts = _plan(members, dest)
    if conflicts:
        raise ArchiveConflictError(
            f"{len(conflicts)} archived file(s) differ from the sweep's ({', '.join(conflicts[:5])}"
            f"{', ...' if len(conflicts) > 5 else ''}): a member of the same name was archived from another run. "
            f"Nothing was written; archive into another directory, or remove those members from {dest} first")
    result = ArchiveResult()
    for member, copies in plan:
        for src, dst in copies:
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dst, src.read_bytes())
        (result.archived if copies else result.unchanged).append(member)
    for name in SWEEP_FILES:
        src, dst = sweep_dir / name, dest / name
        if src.is_file() and not dst.exists():
            atomic_write_bytes(dst, src.read_bytes())
        elif src.is_file() and dst.read_bytes() != src.read_bytes():
            log.info("%s: kept the archive's copy (from the first part archived), not %s's", dst, sweep_dir)
    log.info("archive %s: %d member(s) copied, %d already there", dest, len(result.archived), len(result.unchanged))
    return result
