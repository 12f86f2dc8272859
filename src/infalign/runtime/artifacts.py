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

A miss next to entries of the same kind says why before it builds: the stored key of the nearest entry is
diffed against the new one (:func:`explain_rebuild`) and logged as a warning, e.g. ``rebuilding reward: key
max_response_tokens (data.max_response_tokens) changed from 64 to 16 (entry baface8a4a09b136); this takes about
59 s, as that entry's build did``.

A cache root that cannot be written (read-only, no permission, full) fails with a message naming the directory,
the cause and the way out (``cache_root=...`` or ``$INFALIGN_CACHE``): up front when it holds no entry at all
(:func:`cache_root_warning`, which the config schema applies before torch is imported), else when an entry has
to be built there. A build marks its stage (:mod:`infalign.runtime.signals`), so a stop signal during it names
it; its temporary directory is removed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infalign.runtime import signals
from infalign.runtime.atomic import (
    WRITE_ERRNOS,
    atomic_write_text,  # noqa: F401  (re-exported: build.py imports it from here)
    give_plain_modes,
    make_temp_dir,
    plain_mode,
    write_error,
)
from infalign.runtime.paths import cache_root as default_cache_root

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class CacheError(RuntimeError):
    """An entry could not be built or stored."""


# what a build of each kind makes, for the stage a stop signal names
KIND_LABELS = {"tokenizer": "the tokenizer", "policy": "the reference policy", "reward": "the reward model",
               "reference_samples": "the calibration cache"}
CACHE_FIX = "set cache_root=<a writable folder> (or $INFALIGN_CACHE) to keep the cache elsewhere"


def cache_write_error(directory: Path, error: OSError, subject: str) -> OSError:
    """The `FileWriteError` of a cache that cannot be written (`infalign.runtime.atomic.write_error`)."""
    return write_error(directory, error, subject=subject, fix=CACHE_FIX)


def cache_root_warning(cache_root: str | Path | None) -> str | None:
    """Refuse in milliseconds a cache root that cannot be written and holds no entry: every model would have to be
    built there, and the first build would fail after the data was read. A read-only root that holds entries is
    allowed (a shared, prebuilt cache): the warning to give is returned, since a missing entry fails when it is
    built. The root is created if absent. The config check applies it (`infalign.config.check`)."""
    root = Path(cache_root) if cache_root is not None else Path(default_cache_root())
    try:
        root.mkdir(parents=True, exist_ok=True)
        plain_mode(root)  # creates and removes a probe file: the one sure test (root ignores permission bits)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
            return (f"cache_root {root} cannot be written ({e.strerror}): its entries are used, but one that must be "
                    f"built fails; {CACHE_FIX}")
        raise cache_write_error(root, e, f"into the cache directory cache_root={root}") from None
    return None


def check_cache_root(cache_root: str | Path | None) -> None:
    """`cache_root_warning`, its warning logged."""
    if warning := cache_root_warning(cache_root):
        log.warning("%s", warning)


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


def _written_in(error: OSError, folder: Path) -> bool:
    """Whether `error` came from a file inside `folder` (its `filename`, or a `FileWriteError`'s `path`); an error
    that names no file is taken to, since the build writes nowhere else."""
    name = getattr(error, "path", None) or error.filename
    return name is None or str(name).startswith(str(folder))


_reported: tuple[Any, set[Path]] = (None, set())  # (the run, the entries it has reported a hit or a build of)


def _first_report(path: Path) -> bool:
    """Whether the run has not yet reported a hit or a build of the entry at `path` (and now it has). The reward
    model's loader looks up the reference policy and its tokenizer again (for its backbone), right after the run
    loaded or built them: without this, their `cache hit` lines printed twice. A run is a Hydra job (each multirun
    member reports its own hits), else the process."""
    global _reported
    hydra = sys.modules.get("hydra.core.hydra_config")  # never imported here: a Hydra run has imported it
    try:  # a composed config (tests, notebooks) may leave Hydra's runtime unset: then the process
        run = hydra.HydraConfig.get().runtime.output_dir if hydra and hydra.HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - omegaconf's MissingMandatoryValue
        run = None
    if run != _reported[0]:
        _reported = (run, set())
    first = path not in _reported[1]
    _reported[1].add(path)
    return first


def get_or_build(
    cache_root: str | Path | None,
    kind: str,
    key: Mapping[str, Any],
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    sources: Mapping[str, str] | None = None,
    what: str | None = None,
) -> CacheEntry:
    """Return the entry for ``key`` under ``<cache_root>/<kind>/``, building it first if needed.

    ``build(tmp_dir)`` writes the artefact's files into ``tmp_dir`` and may return a JSON-able ``meta``
    dict (metrics, versions) that is stored in the manifest and returned as ``entry.meta``.
    If two processes build the same entry concurrently, the first rename wins and the other's copy is
    dropped; both return a valid entry. Where other entries of ``kind`` exist, the keys that changed against
    the nearest one are logged before the build (``sources``: see :func:`explain_rebuild`). ``what`` names the
    artefact in the build's stage (default: :data:`KIND_LABELS`), e.g. ``"the distillation pool"``.
    """
    key = _canonical(key)
    path = entry_path(cache_root, kind, key)
    if (hit := lookup(cache_root, kind, key)) is not None:
        # once per entry and run at INFO; a repeat lookup at DEBUG
        log.log(logging.INFO if _first_report(path) else logging.DEBUG, "cache hit: %s/%s", kind, path.name)
        return hit

    log.info("cache miss: %s/%s, building", kind, path.name)
    try:
        why = explain_rebuild(cache_root, kind, key, sources)
    except Exception as e:  # noqa: BLE001 - an explanation must never stop a build
        why = None
        log.debug("could not compare %s/%s with the stored entries: %s", kind, path.name, e)
    if why:
        log.warning("%s", why)
    label = what or KIND_LABELS.get(kind, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_builds(path.parent)
        tmp = make_temp_dir(path.parent, _temp_prefix(path.name))  # 0o777 less the umask, not mkdtemp's 0700
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise cache_write_error(path.parent, e, f"{label} into the cache at {path.parent}") from None
    try:
        t0 = time.time()
        try:
            with signals.stage(f"building {label}"):
                meta = dict(build(tmp) or {})
        except OSError as e:  # what the build writes into its temporary directory, on a full disk say
            if e.errno not in WRITE_ERRNOS or not _written_in(e, tmp):
                raise
            raise cache_write_error(path.parent, e, f"{label} into the cache at {path.parent}") from None
        give_plain_modes(tmp)  # safetensors writes model files 0600: readable by whom the umask allows
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
    _first_report(path)  # a later lookup in this run is no news
    return CacheEntry(path=path, key=key, meta=manifest["meta"], hit=False)
