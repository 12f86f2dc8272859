"""A small content-addressed cache of build artefacts (tokenizers, models, calibration tables, ...).

An entry lives at ``<cache_root>/<kind>/<hash>`` where ``hash = fingerprint(key)`` and ``key`` is a
JSON-able description of *everything* that determines the artefact (config, data fingerprint, seed, ...).
A changed config therefore gives a new entry, never a stale one.

Entries are built by a callback into a private temporary directory next to the final one, a
``manifest.json`` (key, creation time, sha256 + size of every file, free-form ``meta``) is written, and the
directory is renamed into place in one step, so a crash mid-build never leaves a half-entry under the final
name. On every load the manifest is checked against the key and the files on disk; a corrupt, truncated or
mismatched entry is logged, moved aside and rebuilt, never used.

    entry = get_or_build(cache_root, "policy", key, lambda tmp: train_and_save(tmp))
    model = AutoModel.from_pretrained(entry.path)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infalign.runtime.atomic import atomic_write_text  # noqa: F401  (re-exported: build.py imports it from here)
from infalign.runtime.paths import cache_root as default_cache_root

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class CacheError(RuntimeError):
    """An entry could not be built or stored."""


def _canonical(obj: Any) -> Any:
    """Turn configs and common scalars into plain JSON types, rejecting anything ambiguous."""
    try:  # DictConfig/ListConfig -> plain containers, interpolations resolved
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"fingerprint keys must be strings, got {k!r} ({type(k).__name__})")
            out[k] = _canonical(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"cannot fingerprint non-finite float {obj!r}")
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot fingerprint object of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (dicts, lists, DictConfigs, scalars), as hex.

    Key order does not matter; ``1`` and ``1.0`` differ (JSON keeps them apart), so keep config types
    stable. ``length`` truncates the hex digest (16 hex chars = 64 bits, plenty for cache directories).
    """
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
    return digest[:length] if length else digest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    key: dict
    meta: dict = field(default_factory=dict)
    hit: bool = False  # True when loaded from an existing entry, False when just built

    @property
    def hash(self) -> str:
        return self.path.name


def _scan_files(root: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    return files


def verify_entry(path: Path, key: Any | None = None) -> tuple[bool, str, dict]:
    """Check an entry against its manifest (and ``key`` if given): ``(ok, reason, manifest)``."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return False, "manifest missing (interrupted build?)", {}
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return False, f"manifest unreadable: {e}", {}
    if manifest.get("version") != MANIFEST_VERSION:
        return False, f"manifest version {manifest.get('version')!r} != {MANIFEST_VERSION}", manifest
    if key is not None and canonical_json(manifest.get("key")) != canonical_json(key):
        return False, "manifest key differs from the requested key (hash collision or tampering)", manifest
    if manifest.get("hash") != Path(path).name:
        return False, f"manifest hash {manifest.get('hash')!r} != directory name", manifest
    listed = manifest.get("files", {})
    on_disk = {p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file()} - {MANIFEST}
    if extra := on_disk - set(listed):
        return False, f"unlisted files {sorted(extra)[:3]}", manifest
    for rel, info in listed.items():
        f = Path(path) / rel
        if not f.is_file():
            return False, f"file missing: {rel}", manifest
        if f.stat().st_size != info["size"]:
            return False, f"size mismatch (truncated?): {rel}", manifest
        if file_sha256(f) != info["sha256"]:
            return False, f"checksum mismatch: {rel}", manifest
    return True, "ok", manifest


def _discard(path: Path, reason: str) -> None:
    """Move a bad entry out of the way (rename is atomic) and then delete it."""
    log.warning("cache entry %s is invalid (%s): discarding and rebuilding", path, reason)
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return  # someone else already removed it
    shutil.rmtree(trash, ignore_errors=True)


def _temp_prefix(name: str) -> str:
    # host and pid in the name: a later build can tell a dead builder's leftovers from a live one's work
    return f".tmp-{name}-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_builds(kind_dir: Path) -> list[Path]:
    """Delete temp build dirs of killed builders on this host, and trash a killed discard left behind."""
    removed, marker = [], f"-{socket.gethostname()}-"
    if not kind_dir.is_dir():
        return removed
    for p in kind_dir.iterdir():
        dead = p.name.startswith(".trash-")
        if p.name.startswith(".tmp-") and marker in p.name:  # .tmp-<hash>-<host>-<pid>-<random>
            pid = p.name.rsplit(marker, 1)[1].split("-", 1)[0]
            dead = pid.isdigit() and not _pid_alive(int(pid))
        if dead:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("cache: removed %d leftover(s) of interrupted builds in %s", len(removed), kind_dir)
    return removed


def entry_path(cache_root: str | Path | None, kind: str, key: Any) -> Path:
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"invalid cache kind {kind!r}")
    return root / kind / fingerprint(key)


def lookup(cache_root: str | Path | None, kind: str, key: Any) -> CacheEntry | None:
    """The valid entry for ``key``, or None (an invalid one is discarded)."""
    path = entry_path(cache_root, kind, key)
    if not path.exists():
        return None
    ok, reason, manifest = verify_entry(path, key)
    if not ok:
        _discard(path, reason)
        return None
    return CacheEntry(path=path, key=manifest["key"], meta=manifest.get("meta", {}), hit=True)


def get_or_build(
    cache_root: str | Path | None,
    kind: str,
    key: Mapping[str, Any],
    build: Callable[[Path], Mapping[str, Any] | None],
) -> CacheEntry:
    """Return the entry for ``key`` under ``<cache_root>/<kind>/``, building it first if needed.

    ``build(tmp_dir)`` writes the artefact's files into ``tmp_dir`` and may return a JSON-able ``meta``
    dict (metrics, versions) that is stored in the manifest and returned as ``entry.meta``.
    If two processes build the same entry concurrently, the first rename wins and the other's copy is
    dropped; both return a valid entry.
    """
    key = _canonical(key)
    path = entry_path(cache_root, kind, key)
    if (hit := lookup(cache_root, kind, key)) is not None:
        log.info("cache hit: %s/%s", kind, path.name)
        return hit

    log.info("cache miss: %s/%s, building", kind, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))
    try:
        t0 = time.time()
        meta = dict(build(tmp) or {})
        manifest = {
            "version": MANIFEST_VERSION,
            "kind": kind,
            "hash": path.name,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 3),
            "meta": _canonical(meta),
            "files": _scan_files(tmp),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, path)  # atomic; fails if another process already created the entry
        except OSError as e:
            if (other := lookup(cache_root, kind, key)) is not None:
                log.info("cache entry %s/%s was built concurrently; using that one", kind, path.name)
                return other
            raise CacheError(f"could not move the built entry into place at {path}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cache stored: %s (%.1f s)", path, manifest["build_seconds"])
    return CacheEntry(path=path, key=key, meta=manifest["meta"], hit=False)
