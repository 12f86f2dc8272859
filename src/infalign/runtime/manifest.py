"""The address and the manifest of a cache entry (:mod:`infalign.runtime.artifacts`), and why a missed key is rebuilt.

A key is turned into canonical JSON and hashed (:func:`fingerprint`); the entry for it lives at
``<cache_root>/<kind>/<hash>`` (:func:`entry_path`). Its ``manifest.json`` records the key and the sha256 and size
of every file, and :func:`verify_entry` checks an entry on disk against it. This is the cache's on-disk format,
with no building in it; the fingerprint is also what other modules use to name data and runs.

On a miss next to entries of the same kind, :func:`infalign.runtime.artifacts.get_or_build` logs
:func:`explain_rebuild`'s sentence, e.g. ``rebuilding reward: key max_response_tokens (data.max_response_tokens)
changed from 64 to 16 (entry baface8a4a09b136); this takes about 59 s, as that entry's build did``. Only the
manifests are read: this explains a miss, it never vouches for an entry.
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


# ------------------------------------------------------------------ why a missed key is rebuilt
_ABSENT = "(absent)"
_MAX_LISTED = 6  # changed keys named in a rebuild message; the rest are counted
_SORT_FIELDS = ("kind", "stream")  # key fields that tell different sorts of artefact apart within one cache kind


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A key as ``{dotted.path: value}`` (lists are values: a changed list is one changed key)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def key_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted.path, old value, new value)`` for every leaf in which two keys differ (``"(absent)"`` where
    one key lacks it), sorted by path."""
    a, b = _leaves(_canonical(old)), _leaves(_canonical(new))
    return [(p, a.get(p, _ABSENT), b.get(p, _ABSENT)) for p in sorted(set(a) | set(b))
            if canonical_json(a.get(p, _ABSENT)) != canonical_json(b.get(p, _ABSENT))]


def nearest_entry(kind_dir: Path, key: Mapping[str, Any]) -> tuple[str, dict, list[tuple[str, Any, Any]]] | None:
    """The stored entry of ``kind_dir`` whose key is closest to ``key``: ``(hash, manifest, changes)``, or None.

    Closest: the fewest changed leaves, then the newest. Only entries of the same sort are compared: the same
    ``kind`` field in the key (a tiny GPT-2 versus a converted SmolLM2, say) and the same ``stream`` (the
    calibration samples versus a distillation pool). Only the manifests are read (no checksums): this explains
    a miss, it does not vouch for an entry.
    """
    if not kind_dir.is_dir():
        return None
    key = _canonical(key)
    own, best, best_rank = fingerprint(key), None, None
    for p in kind_dir.iterdir():
        if p.name.startswith(".") or p.name == own or not p.is_dir():
            continue
        try:
            manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        old = manifest.get("key")
        if not isinstance(old, Mapping) or any(old.get(f) != key.get(f) for f in _SORT_FIELDS):
            continue
        changes = key_changes(old, key)
        if not changes:
            continue
        rank = (len(changes), -_mtime(p / MANIFEST))
        if best_rank is None or rank < best_rank:
            best, best_rank = (p.name, manifest, changes), rank
    return best


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def explain_rebuild(cache_root: str | Path | None, kind: str, key: Mapping[str, Any],
                    sources: Mapping[str, str] | None = None) -> str | None:
    """Why ``key`` misses where entries of ``kind`` exist: the keys that changed against the nearest one.

    ``sources`` maps a key's top-level fields to the config keys they come from (``{"train":
    "reward.train"}`` names ``train.epochs`` as ``reward.train.epochs``); a field it does not name is shown as
    the key's own dotted path. None when there is no entry of this kind to compare with (a first build).
    """
    near = nearest_entry(entry_path(cache_root, kind, key).parent, key)
    if near is None:
        return None
    name, manifest, changes = near
    sources = dict(sources or {})

    def label(path: str) -> str:
        top, _, rest = path.partition(".")
        if top not in sources:
            return path
        src = sources[top]
        return f"{path} ({src}{'.' + rest if rest else ''})" if src != path else path

    def show(v: Any) -> str:
        text = v if v == _ABSENT else json.dumps(v, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."

    listed = [f"{label(p)} changed from {show(a)} to {show(b)}" for p, a, b in changes[:_MAX_LISTED]]
    more = f" and {len(changes) - _MAX_LISTED} more" if len(changes) > _MAX_LISTED else ""
    took = manifest.get("build_seconds")
    cost = (f"this takes about {_duration(float(took))}, as that entry's build did" if isinstance(took, (int, float))
            else "this may take a while")
    return (f"rebuilding {kind}: key{'s' if len(changes) > 1 else ''} {'; '.join(listed)}{more} "
            f"(entry {name}); {cost}")
