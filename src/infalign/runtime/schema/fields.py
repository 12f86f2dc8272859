"""Each key on its own: the config as plain data, known keys only, and every key of `KEYS` against its rule."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from infalign.runtime.schema.keys import CLOSED, HINTS, KEYS, RETIRED, TARGET_KEYS, TOP_LEVEL, Key
from infalign.runtime.schema.rules import HYDRA_KEYS, ConfigError, _int, _show

# ---------------------------------------------------------------------------------------------- helpers
_ABSENT = object()


def _get(c: Mapping, path: str):
    node = c
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _source(group: str, choices: Mapping | None) -> str:
    choice = (choices or {}).get(group)
    return f"conf/{group}/{choice}.yaml" if choice else f"the {group} config (conf/{group}/)"


def _unknown(path: str, where: str, known) -> ConfigError:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in HINTS and not path.startswith(HINTS[leaf].rsplit(".", 1)[0] + ".") and path != HINTS[leaf]:
        hint = f"; {leaf} is set as {HINTS[leaf]}"
    else:
        close = difflib.get_close_matches(leaf, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{path}: unknown key in {where}; known keys: {', '.join(sorted(known))}{hint}")


def _plain(cfg) -> dict:
    """The config as plain data, interpolations resolved (`???` kept as is: the model's loader check names it).
    `logger` and `hydra` stay unresolved: they read Hydra's runtime (`${hydra:runtime.output_dir}`)."""
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise ConfigError(f"the config must be a mapping, got {type(cfg).__name__}")
    out = {}
    unresolved = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in cfg:
        if key in ("logger", "hydra"):
            out[key] = unresolved[key]
            continue
        try:
            node = cfg[key]
            out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except OmegaConfBaseException as e:  # e.g. study.beta_index outside a method's beta grid
            where = getattr(e, "full_key", None) or key
            reason = str(getattr(e, "msg", None) or e).splitlines()[0]  # omegaconf appends full_key etc. below
            raise ConfigError(f"{where} cannot be resolved: {reason}") from None
    return out


def processes(trainer) -> int | None:
    """Processes a trainer config starts (devices x num_nodes; None when Lightning decides: auto, -1)."""
    trainer = trainer or {}
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1) or 1
    nodes = int(nodes) if _int(nodes) else 1
    if _int(devices):
        return devices * nodes if devices >= 1 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices) * nodes
    if isinstance(devices, str) and "," in devices:  # "0,1": device indices
        return len([d for d in devices.split(",") if d.strip()]) * nodes
    devices = list(devices) if OmegaConf.is_list(devices) else devices
    return len(devices) * nodes if isinstance(devices, list) else None


# ---------------------------------------------------------------------------------------------- key checks
def _check_key(c: Mapping, path: str, key: Key) -> None:
    parent, _, leaf = path.rpartition(".")
    container = _get(c, parent) if parent else c
    if container is _ABSENT or container is None:
        if key.required:
            raise ConfigError(f"{path} must be set ({key.what}); e.g. {path}={key.example}")
        return
    if not isinstance(container, Mapping):
        raise ConfigError(f"{parent} must be a mapping of its keys (see conf/train.yaml), got {_show(container)}")
    value = container.get(leaf, _ABSENT)
    if value is _ABSENT or value == "???":
        if key.required:
            raise ConfigError(f"{path} must be set ({key.what}); e.g. {path}={key.example}")
        return
    if isinstance(value, str) and (path, value) in RETIRED:
        raise ConfigError(RETIRED[(path, value)])
    if not key.rule.test(value):
        raise ConfigError(f"{path} must be {key.rule.allowed} ({key.what}), got {_show(value)}; "
                          f"e.g. {path}={key.example}")


def _check_known_keys(c: Mapping, choices: Mapping | None) -> None:
    for key in c:
        if key not in TOP_LEVEL:
            raise _unknown(key, "the config (conf/train.yaml and its groups)", TOP_LEVEL)
    for section in CLOSED:
        known = {p.split(".", 1)[1] for p in KEYS if p.startswith(section + ".")}
        node = c.get(section)
        for key in node if isinstance(node, Mapping) else ():  # not a mapping: _check_key says so
            if key not in known:
                raise _unknown(f"{section}.{key}", f"the {section} config (conf/train.yaml)", known)
    for section, targets in TARGET_KEYS.items():
        node = c.get(section)
        if not isinstance(node, Mapping) or node.get("_target_") not in targets:
            continue
        known = set(targets[node["_target_"]])
        where = (_source(section, choices) if section in ("trainer", "transform")
                 else f"the {section} config (conf/train.yaml: {node['_target_']}'s parameters)")
        for key in node:
            if key not in known and key not in HYDRA_KEYS:
                raise _unknown(f"{section}.{key}", where, known)
