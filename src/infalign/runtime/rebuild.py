"""Why a cache entry is rebuilt: the stored key nearest to a missed one, and the keys that changed.

On a miss next to entries of the same kind, :func:`infalign.runtime.artifacts.get_or_build` logs
:func:`explain_rebuild`'s sentence, e.g. ``rebuilding reward: key max_response_tokens (data.max_response_tokens)
changed from 64 to 16 (entry baface8a4a09b136); this takes about 59 s, as that entry's build did``. Only the
manifests are read: this explains a miss, it never vouches for an entry.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infalign.runtime.manifest import MANIFEST, _canonical, canonical_json, entry_path, fingerprint

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
