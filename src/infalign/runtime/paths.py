"""Where the project's config tree, data and cache live, and the config's own resolvers. The configs sit at the
repository root (`conf/`), found beside this file in an editable install or through `INFALIGN_CONF_DIR`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/infalign/runtime/paths.py -> the checkout


def conf_dir() -> str:
    path = Path(os.environ.get("INFALIGN_CONF_DIR", REPO_ROOT / "conf")).resolve()
    if not (path / "transform").is_dir():
        raise FileNotFoundError(
            f"config directory {path} not found (it needs conf/transform/): install infalign editable from a "
            "checkout (`pip install -e .`) or point INFALIGN_CONF_DIR at the repository's conf/ folder"
        )
    return str(path)


def data_root() -> str:
    """HH-RLHF root: `INFALIGN_DATA_ROOT`, else `../shared/data/hh-rlhf` beside the checkout."""
    return str(Path(os.environ.get("INFALIGN_DATA_ROOT", REPO_ROOT.parent / "shared" / "data" / "hh-rlhf")))


def cache_root() -> str:
    """Built models and calibration caches: `INFALIGN_CACHE`, else `<repo>/.cache` (git-ignored)."""
    return str(Path(os.environ.get("INFALIGN_CACHE", REPO_ROOT / ".cache")))


def pick(values, index):
    """`${infalign.pick:<list>,<i>}`: the i-th item of a list; `${infalign.pick:<mapping>,<key>}`: the item under
    the key (as written, or as an integer: `{4: 0.14, 8: 0.11}` picked by `${n}`). Study presets pick per-method
    beta grids by a swept index or by N (OmegaConf cannot index with an interpolated value)."""
    if isinstance(values, Mapping):
        for key in (index, str(index), *([int(index)] if str(index).lstrip("-").isdigit() else [])):
            if key in values:
                return values[key]
        raise KeyError(f"{index!r} is not one of the keys {list(values)}")
    index = int(index)
    if not 0 <= index < len(values):
        raise IndexError(f"index {index} is outside the list {list(values)} (it has {len(values)} items)")
    return values[index]


def fraction(count, share):
    """`${infalign.fraction:<count>,<share>}`: share x count rounded up to a whole number (at least 1 of a count
    >= 1). conf/solver/distill_rl.yaml distils the first half of whatever rl.iterations a scale sets:
    `${infalign.fraction:${rl.iterations},0.5}` (30 -> 15, 3 -> 2)."""
    count, share = int(count), float(share)
    if count < 0 or not 0 <= share <= 1:
        raise ValueError(f"infalign.fraction takes a count >= 0 and a share from 0 to 1, got {count}, {share}")
    return math.ceil(count * share)


def register_resolvers() -> None:
    """Register `${infalign.data_root:}`, `${infalign.cache_root:}`, `${infalign.pick:...}` and
    `${infalign.fraction:...}` (idempotent)."""
    from omegaconf import OmegaConf

    for name, fn in (("infalign.data_root", data_root), ("infalign.cache_root", cache_root), ("infalign.pick", pick),
                     ("infalign.fraction", fraction)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
