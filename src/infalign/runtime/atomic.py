"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through the same three steps: write a temporary file in the target's directory (the
rename must stay on one file system), flush and fsync it (so a power cut after the rename cannot leave a
renamed but empty file), then `os.replace` it over the target and fsync the directory (so the rename itself
is durable). A crash before the rename leaves the old file untouched plus a `.<name>.<random>.tmp` file;
`remove_stale_temps` clears those on the next start.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Iterable, Mapping

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_csv",
           "read_csv_rows", "remove_stale_temps", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"
# mkstemp creates files readable by the owner only; the files we replace were made with the umask
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open a directory: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call `write(binary_file)` on a temp file next to `path`, fsync it, and rename it over `path`.

    `before_replace(temp_path)` runs between the fsync and the rename (e.g. to record a checksum first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def atomic_write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str] | None = None) -> Path:
    """Rows as CSV with a header (`fieldnames` default: every key in order of first appearance)."""
    rows = list(rows)
    fields = fieldnames or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """`(header, rows)` of a CSV file; `([], [])` when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files a crashed `atomic_write` left in `directory` (not recursive)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
