"""The keys that name files, checked on the file system: a model or tokenizer given by path must be a folder that
exists (`model.name_or_path`, `model.tokenizer_name_or_path`, `reward.name_or_path`), and a cache root that holds
no entry must be writable (`cache_root`). Later, both would fail after torch is imported: transformers four
tracebacks deep about a hub id's characters, the first cache build after the data was read."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

from infalign.runtime.artifacts import CACHE_FIX, cache_root_warning
from infalign.runtime.atomic import FileWriteError
from infalign.runtime.model_paths import PATH_KEYS, model_path_problem
from infalign.runtime.schema.rules import ConfigError

MODEL_GROUPS = ("model", "reward")  # the config groups whose loaders take a model by hub id or local folder


def _check_model_paths(c: Mapping) -> None:
    """A path that names no usable model (`model_path_problem`: a missing folder, a file, a folder without
    config.json) is refused; a hub id is left to the hub, and an unset value to the loader's check."""
    for group in MODEL_GROUPS:
        node = c.get(group)
        for key in PATH_KEYS if isinstance(node, Mapping) else ():
            if key in node and (problem := model_path_problem(f"{group}.{key}", node[key])):
                raise ConfigError(problem)


def _check_cache_root(c: Mapping) -> str | None:
    """`cache_root` can be written (it is created if absent: so this check comes last), or holds entries: a shared,
    prebuilt cache, used with the warning returned. `infalign.runtime.artifacts.cache_root_warning` decides."""
    root = c["cache_root"]
    try:
        return cache_root_warning(root)
    except FileWriteError as e:  # names the folder, the cause and the way out
        raise ConfigError(str(e)) from e
    except OSError as e:  # not a folder: a file, or under one
        cause = "it is a file" if Path(root).is_file() else f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
        raise ConfigError(f"cache_root={root} cannot be the cache directory: {cause}; {CACHE_FIX}") from e
