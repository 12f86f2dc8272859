"""Checkpoint files that survive crashes and refuse to load when damaged or unsafe.

Kept instead of Lightning's `TorchCheckpointIO` (2.6.6), which loads a checkpoint with a bit flipped inside its
tensors without a word (tests/test_reliability.py::test_damaged_checkpoint_is_refused_naming_the_file_and_the_way_out
[flip]) and writes through a temp file in the system temp dir and `shutil.move`: a copy across file systems, without
fsync, so a kill mid-copy can leave a truncated `last.ckpt`. Here a checkpoint is written atomically
(`infalign.runtime.atomic`); its sha256 goes to `<name>.sha256` before the rename, listed before the previous
digests, so whatever is in place after a crash verifies; it is checked before loading, and the load is
`torch.load(weights_only=True)`: a checkpoint is data, and unpickling arbitrary objects would run code from the file.
A full disk raises `FileWriteError` naming the checkpoint (torch.save would say "unexpected pos 166976 vs 166864").
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from infalign.runtime.atomic import WRITE_ERRNOS, FileWriteError, atomic_write, atomic_write_json, write_error
from infalign.runtime.errors import ConfigError
from infalign.runtime.manifest import file_sha256

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "SafeCheckpointIO", "load_checkpoint", "verify_checkpoint", "checksum_path"]

_KEEP_DIGESTS = 3  # the new digest + the ones a crash between the two renames could leave in place


class CheckpointError(ConfigError, RuntimeError):
    """A checkpoint that must not be used: missing, truncated, corrupted, or not plain data. A user's error, printed
    in one line by train.py (`ConfigError`)."""


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _known_digests(path: Path) -> list[str] | None:
    """The digests the sidecar accepts, or None when there is no (readable) sidecar."""
    side = checksum_path(path)
    if not side.is_file():
        return None
    try:
        digests = json.loads(side.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [d for d in digests if isinstance(d, str)]


def _what_to_do(path: Path) -> str:
    return (f"Restore {path.name} from a backup, or start the run afresh in its directory with overwrite=true "
            f"(its checkpoints and metrics are replaced), or point hydra.run.dir elsewhere.")


def load_checkpoint(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False,
                    checksum: bool = True) -> dict:
    """Check the sha256 (unless `checksum=False`: verified already), then `torch.load(weights_only=True)`; every
    failure is a `CheckpointError` naming the file. `mmap`: map the tensors instead of reading them (zip format)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    digests = _known_digests(path) if checksum else None
    if checksum and digests is None:
        log.info("checkpoint %s has no checksum file; it is load-checked only", path)
    elif checksum and file_sha256(path) not in digests:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated: its sha256 does not match {checksum_path(path).name} "
            f"({path.stat().st_size} bytes on disk). {_what_to_do(path)}")
    try:
        return torch.load(path, map_location=map_location, mmap=mmap and zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any class it does not know: the file would run code if unpickled fully
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data; refusing to unpickle it "
            f"(weights_only=True), since that could execute code from the file. If you wrote it yourself and "
            f"trust it, re-save its tensors as plain data. ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                              f"{_what_to_do(path)}") from None


def verify_checkpoint(path: str | Path) -> None:
    """Raise `CheckpointError` unless `path` matches its recorded sha256 (if any) and loads as plain data. The load
    check maps the tensors, so it costs little even for large checkpoints; it catches truncation (no zip
    directory) and anything `weights_only` refuses."""
    if Path(path).is_dir():  # a sharded checkpoint (DeepSpeed, FSDP sharded): its strategy reads and checks it
        log.info("checkpoint %s is a directory (sharded); left to the strategy to load", path)
        return
    load_checkpoint(path, mmap=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, checksummed, weights-only checkpoint IO for Lightning (`Trainer(plugins=[SafeCheckpointIO()])`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        digest = hashlib.sha256()
        failed: list[OSError] = []  # what the disk said, which torch.save replaces by its own RuntimeError

        def write(f):
            class Hashing:  # hash while torch writes, instead of reading the file back
                def write(self, data):
                    digest.update(data)
                    try:
                        return f.write(data)
                    except OSError as e:
                        failed.append(e)
                        raise

                def flush(self):
                    f.flush()

            torch.save(checkpoint, Hashing())

        def record_digest(_tmp):  # before the rename: whatever is in place afterwards verifies
            digests = list(dict.fromkeys([digest.hexdigest(), *(_known_digests(path) or [])]))
            atomic_write_json(checksum_path(path), {"file": path.name, "sha256": digests[:_KEEP_DIGESTS]})

        try:
            atomic_write(path, write, before_replace=record_digest)
        except Exception as e:
            cause = e.__cause__ if isinstance(e, FileWriteError) else (failed[0] if failed else e)
            if not (isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS):
                raise
            side = f" (its checksum file {e.path.name})" if isinstance(e, FileWriteError) and e.path != path else ""
            raise write_error(path, cause, subject=f"checkpoint{side} {path}",
                              fix="point hydra.run.dir elsewhere. The checkpoint already there, if any, is unchanged: "
                                  "continue the run with resume=true once there is room") from None

    def load_checkpoint(self, path, map_location: Callable | Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise CheckpointError(f"{type(self).__name__} loads checkpoints with weights_only=True only")
        return load_checkpoint(path, map_location=map_location or "cpu")
