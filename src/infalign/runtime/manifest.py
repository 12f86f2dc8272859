"""The address and the manifest of a cache entry (`infalign.runtime.artifacts`), and why a missed key is rebuilt.

A key's address is the sha256 of its canonical JSON (`fingerprint`), also what other modules name data and runs by;
`manifest.json` records the key and the sha256 and size of every file (`verify_entry`). `explain_rebuild` reads
only the manifests: it explains a miss, it never vouches for an entry.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from infalign.runtime.paths import cache_root as default_cache_root

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _plain(obj: Any) -> Any:
    """What `json.dumps` cannot write itself: configs (interpolations resolved) and paths; anything else refused."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot fingerprint object of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """One text per value: keys sorted, no spaces, `1` and `1.0` apart, NaN and infinity refused (ValueError)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain)


def canonical(obj: Any) -> Any:
    """`obj` as plain JSON types (what the manifest stores)."""
    return json.loads(canonical_json(obj))


def fingerprint(obj: Any, length: int = 16) -> str:
    """sha256 of `canonical_json(obj)` as hex, cut to `length` characters (16: 64 bits, plenty for a cache)."""
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
    return digest[:length] if length else digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
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


def verify_entry(path: Path, key: Any) -> tuple[bool, str, dict]:
    """Check an entry against its manifest and `key`: `(ok, reason, manifest)`."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return False, "manifest missing (interrupted build?)", {}
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return False, f"manifest unreadable: {e}", {}
    if manifest.get("version") != MANIFEST_VERSION:
        return False, f"manifest version {manifest.get('version')!r} != {MANIFEST_VERSION}", manifest
    if canonical_json(manifest.get("key")) != canonical_json(key):
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
    a, b = _leaves(canonical(old)), _leaves(canonical(new))
    return [(p, a.get(p, _ABSENT), b.get(p, _ABSENT)) for p in sorted(set(a) | set(b))
            if canonical_json(a.get(p, _ABSENT)) != canonical_json(b.get(p, _ABSENT))]


def nearest_entry(kind_dir: Path, key: Mapping[str, Any]) -> tuple[str, dict, list[tuple[str, Any, Any]]] | None:
    """The stored entry of ``kind_dir`` whose key is closest to ``key``: ``(hash, manifest, changes)``, or None.

    Closest: the fewest changed leaves, then the newest. Only entries of the same sort are compared: the same
    ``kind`` field in the key (a tiny GPT-2 versus a converted SmolLM2, say) and the same ``stream`` (the
    calibration samples versus a distillation pool).
    """
    if not kind_dir.is_dir():
        return None
    key = canonical(key)
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
        rank = (len(changes), -(p / MANIFEST).stat().st_mtime)
        if best_rank is None or rank < best_rank:
            best, best_rank = (p.name, manifest, changes), rank
    return best


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
