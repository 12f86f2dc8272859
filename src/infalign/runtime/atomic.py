"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

A writer writes a temporary file beside the target (the rename must stay on one file system), fsyncs it (a power
cut after the rename must not leave a renamed but empty file), `os.replace`s it over the target and fsyncs the
directory. A crash before the rename leaves the old file plus a `.<name>.<random>.tmp`, which `remove_stale_temps`
clears on the next start.

Modes: the temp file is created with `os.open(..., 0o666)`, as `open(path, "w")` creates one, so the umask (and a
default ACL) applies; `tempfile.mkstemp` would make it 0600, and reading the umask means setting it, process-wide,
racing other threads. Other libraries write owner-only too (safetensors' `model.safetensors`, `mkdtemp`'s
directories): `give_plain_modes` gives such a tree the modes a plain create would, read off a probe file.

A write that fails for a cause the user has to fix (`WRITE_ERRNOS`) raises `FileWriteError`, naming the file, the
cause and what to do.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError

from infalign.runtime.errors import UserError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_csv",
           "atomic_write_figure", "give_plain_modes", "plain_mode", "read_csv_rows", "remove_stale_temps",
           "os_error", "write_error", "write_errors", "FileWriteError", "TMP_SUFFIX", "WRITE_ERRNOS"]

TMP_SUFFIX = ".tmp"
# mkstemp's flags: exclusive creation, binary on Windows, not inherited
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_TRIES = 100
# The causes of a failed write that the user, not the program, has to fix: full disk or quota, read-only mount,
# permissions, a file over the file system's size limit, a failing disk
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class FileWriteError(OSError, UserError):
    """A file could not be written; the message names it, the cause and what to do. An `OSError` (with the
    cause's `errno`), so handlers of the original error still catch it; `path` is the file. A `UserError`: an entry
    point reports it in one line."""

    def __init__(self, message: str, code: int | None, path: Path):
        super().__init__(message)
        self.errno, self.path = code, Path(path)  # no strerror: str() stays the message alone


def write_error(path: str | Path, error: OSError, fix: str = "write it elsewhere",
                subject: str | None = None) -> FileWriteError:
    """`FileWriteError` for `error` (raised writing `path`): `cannot write <subject>: <cause> (<ERRNO>). <what to
    do>`, `subject` by default `path`. The advice names the directory to free space on or make writable (`path`
    when it is a directory, else the one that holds it) and ends with `fix`."""
    path = Path(path)
    code = error.errno
    cause = f"{error.strerror or error} ({errno.errorcode.get(code, code)})" if code else str(error)
    folder = path if path.is_dir() else path.parent
    if code in _FULL:
        todo = f"Free space on the disk that holds {folder} (`df -h {folder}` shows it), or {fix}"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = f"Make {folder} writable, or {fix}"
    else:
        todo = f"Check the disk that holds {folder}, or {fix}"
    return FileWriteError(f"cannot write {subject or path}: {cause}. {todo}.", code, path)


def _new(directory: Path, prefix: str, create: Callable[[str], Any]) -> tuple[Any, str]:
    """`(create(name), name)` for the first free `<directory>/<prefix><random>.tmp`."""
    for _ in range(_TRIES):
        name = str(directory / f"{prefix}{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            return create(name), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name {prefix}<random>{TMP_SUFFIX} in {directory} after {_TRIES} tries")


def _open_plain(name: str) -> int:
    return os.open(name, _CREATE, 0o666)  # 0o666 less the umask, as open(name, "w") creates it (module docstring)


def _create_temp(path: Path) -> tuple[int, str]:
    """`(fd, name)` of a new `.<name>.<random>.tmp` next to `path`."""
    return _new(path.parent, f".{path.name}.", _open_plain)


def plain_mode(directory: str | Path, *, is_dir: bool = False) -> int:
    """The permission bits a new file (`is_dir`: directory) created the plain way in `directory` gets now (the
    umask, or the directory's default ACL, plus a set-group-ID bit a directory inherits), read off a probe."""
    directory = Path(directory)
    if is_dir:
        _, probe = _new(directory, ".mode-probe.", lambda name: os.mkdir(name, 0o777))
        try:
            return os.stat(probe).st_mode & 0o7777
        finally:
            os.rmdir(probe)
    fd, probe = _new(directory, ".mode-probe.", _open_plain)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


def give_plain_modes(root: str | Path) -> list[Path]:
    """Give `root` and every directory and regular file under it that is owner-only (no group or other bits:
    safetensors' 0600 files, `mkdtemp`'s 0700 directories) the mode a plain create gives (`plain_mode`: 0o666 /
    0o777 less the umask); the paths changed. Anything with group or other bits is left as its writer made it,
    symbolic links are not followed. For a tree this process has just written, before it is renamed into place."""
    root = Path(root)
    if not root.is_dir():
        return []
    file_mode, dir_mode = plain_mode(root), plain_mode(root.parent, is_dir=True)
    changed = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            want = dir_mode
        elif stat.S_ISREG(mode):  # an executable stays executable wherever it is readable
            want = file_mode | ((file_mode & 0o444) >> 2 if mode & 0o100 else 0)
        else:  # a symbolic link (not followed), a socket, ...
            continue
        if mode & 0o077 or mode & 0o7777 == want:
            continue
        os.chmod(path, want)
        changed.append(path)
    return changed


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # some file systems (and Windows) cannot open a directory: the rename still happened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write, else None: `error` itself, or the one safetensors (`save_pretrained`)
    reports as its own error, "I/O error: File too large (os error 27)" (tests/test_file_errors.py, the run on a
    file-size limit)."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, SafetensorError) else None
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


@contextmanager
def write_errors(path: str | Path, fix: str = "write it elsewhere") -> Iterator[None]:
    """Writes to `path` within: an `OSError` the user has to fix (`WRITE_ERRNOS`: full disk, read-only, ...), or
    safetensors' error for one, comes out as `write_error`'s `FileWriteError` naming `path` and `fix`; any other
    error as it was."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        cause = os_error(e)
        if isinstance(e, FileWriteError) or cause is None or cause.errno not in WRITE_ERRNOS:
            raise
        raise write_error(path, cause, fix=fix) from e


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call `write(binary_file)` on a temp file next to `path`, fsync it, and rename it over `path`.

    `before_replace(temp_path)` runs between the fsync and the rename (e.g. to record a checksum first). A full disk
    or a read-only directory raises `FileWriteError` naming `path` (the old file, if any, is left as it was)."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        try:
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


def atomic_write_figure(path: str | Path, fig, **savefig_kwargs) -> Path:
    """`fig.savefig(path, **savefig_kwargs)` (a matplotlib figure) through `atomic_write`: a reader never sees half
    an image. The format is the file name's suffix, as `savefig` infers it from a path, unless `format` is given."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    return atomic_write(path, lambda f: fig.savefig(f, **savefig_kwargs))


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
    stale = [p for p in Path(directory).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
