"""The address and the manifest of a cache entry (:mod:`infalign.runtime.artifacts`).

A key is turned into canonical JSON and hashed (:func:`fingerprint`); the entry for it lives at
``<cache_root>/<kind>/<hash>`` (:func:`entry_path`). Its ``manifest.json`` records the key and the sha256 and size
of every file, and :func:`verify_entry` checks an entry on disk against it. This is the cache's on-disk format,
with no building in it; the fingerprint is also what other modules use to name data and runs.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infalign.runtime.paths import cache_root as default_cache_root

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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


def entry_path(cache_root: str | Path | None, kind: str, key: Any) -> Path:
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"invalid cache kind {kind!r}")
    return root / kind / fingerprint(key)
