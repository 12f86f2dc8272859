"""A small content-addressed cache of build artefacts (tokenizers, models, calibration tables, ...).

An entry lives at `<cache_root>/<kind>/<fingerprint(key)>`, where `key` describes everything that determines the
artefact (config, data fingerprint, seed, ...), so a changed config gives a new entry, never a stale one. A build
writes into a temporary directory beside the entry, adds `manifest.json` (key, sha256 and size of every file) and
renames it into place in one step: a crash never leaves a half-entry under the final name. Every load checks the
manifest; a damaged entry is logged, moved aside and rebuilt, never used. A miss beside entries of the same kind
logs which keys changed against the nearest one (`infalign.runtime.manifest.explain_rebuild`).

    entry = get_or_build(cache_root, "policy", key, lambda tmp: train_and_save(tmp))
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from infalign.runtime import signals
from infalign.runtime.atomic import (
    WRITE_ERRNOS,
    atomic_write_text,  # noqa: F401  (re-exported: build.py imports it from here)
    give_plain_modes,
    os_error,
    plain_mode,
    write_error,
)
from infalign.runtime.manifest import (
    MANIFEST,
    MANIFEST_VERSION,
    CacheEntry,
    _scan_files,
    canonical,
    entry_path,
    explain_rebuild,
    verify_entry,
)
from infalign.runtime.paths import cache_root as default_cache_root

log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """An entry could not be built or stored."""


# what a build of each kind makes, for the stage a stop signal names
KIND_LABELS = {"tokenizer": "the tokenizer", "policy": "the reference policy", "reward": "the reward model",
               "reference_samples": "the calibration cache"}
CACHE_FIX = "set cache_root=<a writable folder> (or $INFALIGN_CACHE) to keep the cache elsewhere"


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
        raise write_error(root, e, fix=CACHE_FIX, subject=f"into the cache directory cache_root={root}") from None
    return None


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


def _failed_write(error: Exception, folder: Path | None) -> OSError | None:
    """The OSError behind a build's failed write that the user fixes (a full disk, a read-only folder: WRITE_ERRNOS;
    `atomic.os_error`), else None. Only a file inside `folder` counts (its `filename`, or a `FileWriteError`'s
    `path`; an error that names no file does, as the build writes nowhere else)."""
    if (error := os_error(error)) is None:
        return None
    name = getattr(error, "path", None) or error.filename
    inside = folder is None or name is None or str(name).startswith(str(folder))
    return error if error.errno in WRITE_ERRNOS and inside else None


_reported: tuple[Any, set[Path]] = (None, set())  # (the run, the entries it has reported a hit or a build of)


def _first_report(path: Path) -> bool:
    """Whether the run has not yet reported a hit or a build of the entry at `path` (and now it has): the reward
    model's loader looks up the policy and its tokenizer again, right after the caller loaded them. A run is a
    Hydra job (each multirun member reports its own hits), else the process."""
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
    """The entry for `key` under `<cache_root>/<kind>/`, built first if needed.

    `build(tmp_dir)` writes the artefact's files into `tmp_dir` and may return a JSON-able `meta` dict (stored in
    the manifest, returned as `entry.meta`). Two processes building one entry: the first rename wins, both return a
    valid entry. `sources`: see `explain_rebuild`; `what` names the artefact in the stage a stop signal names
    (default: `KIND_LABELS`), e.g. `"the distillation pool"`. A cache that cannot be written raises the one-line
    `FileWriteError` naming it and the way out (`CACHE_FIX`); the temporary directory is removed.
    """
    key = canonical(key)
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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_builds(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))  # 0700: give_plain_modes
        t0 = time.time()
        with signals.stage(f"building {label}"):
            meta = dict(build(tmp) or {})
        give_plain_modes(tmp)  # safetensors writes model files 0600: readable by whom the umask allows
        manifest = {
            "version": MANIFEST_VERSION,
            "kind": kind,
            "hash": path.name,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 3),
            "meta": canonical(meta),
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
    except (OSError, SafetensorError) as e:  # making the build's directory, or what the build writes there
        if (failed := _failed_write(e, tmp)) is None:
            raise
        raise write_error(path.parent, failed, fix=CACHE_FIX, subject=f"{label} into the cache at {path.parent}") \
            from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cache stored: %s (%.1f s)", path, manifest["build_seconds"])
    _first_report(path)  # a later lookup in this run is no news
    return CacheEntry(path=path, key=key, meta=manifest["meta"], hit=False)
