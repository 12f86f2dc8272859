"""A run's name, group and tags on the remote logger (W&B), from its config, its Hydra choices and its sweep;
`with_identity` fills them into a logger config (`infalign.runtime.loggers.build_loggers`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["MAX_GROUP", "MAX_TAG", "NAMED_KEYS", "run_identity", "swept_keys", "with_identity"]


NAMED_KEYS = ("method", "transform", "n", "beta", "seed", "study.beta_index")  # in the name already (beta_index: beta)
MAX_GROUP = 128  # W&B's limit on a group's length
MAX_TAG = 64  # and on a tag's


def swept_keys(sweep_overrides: list[str], sweeper_params: Mapping | None = None) -> list[str]:
    """The keys a sweep varies: sweep overrides of its command line (`n=2,4`, `seed=range(3)`) and the sweeper's
    `params` from the config (a study's `hydra.sweeper.params`) whose value is a sweep, in order of appearance."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [*sweep_overrides, *(f"{k}={v}" for k, v in (sweeper_params or {}).items())]
    keys = []
    for line in lines:
        try:
            override = parser.parse_override(str(line))
        except Exception:  # noqa: BLE001 - a line Hydra already accepted; never let naming fail a run
            continue
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def run_identity(cfg, choices: Mapping, *, sweep_dir: str | Path | None = None, swept: list[str] = (),
                 member_overrides: list[str] = ()) -> dict:
    """`{"name", "group", "tags"}` of a run for the remote logger.

    name: `<method>-n<n>-b<beta>-s<seed>` (`bon_exp-n4-b0.24-s0`; the method preset, else the transform), then
    `-<key>=<value>` for every other key of `swept` with this member's value from `member_overrides` (a sweep
    over `optimizer.lr` names its members apart); group: the sweep directory's name in a multirun (`sweep_dir`),
    None for a single run; tags: method, solver, `n=<n>`, `study=<name>` and `scale=<name>` where set."""
    method = choices.get("method") or choices.get("transform") or "run"
    name = f"{method}-n{int(cfg.n)}-b{float(cfg.beta):g}-s{int(cfg.seed)}"
    values = {}
    for line in member_overrides:
        key, sep, value = str(line).partition("=")
        if sep:
            values[key.lstrip("+~")] = value
    for key in swept:
        if key not in NAMED_KEYS and key in values:
            name += f"-{key}={values[key]}"
    tags = [method, str(choices.get("solver") or cfg.rl.algo), f"n={int(cfg.n)}"]
    study = cfg.get("study")
    if isinstance(study, Mapping) and study.get("name"):
        tags.append(f"study={study['name']}")
    if choices.get("scale"):
        tags.append(f"scale={choices['scale']}")
    group = Path(sweep_dir).name[-MAX_GROUP:] if sweep_dir else None
    return {"name": name, "group": group, "tags": list(dict.fromkeys(t[:MAX_TAG] for t in tags))}


def with_identity(logger_cfg, identity: Mapping | None):
    """The logger config with `identity`'s name and group where its own are null, and its tags before the
    configured ones. Only keys the config has are filled (a logger without them is left as it is)."""
    if not identity or not logger_cfg:
        return logger_cfg
    cfg = OmegaConf.to_container(logger_cfg, resolve=True) if isinstance(logger_cfg, DictConfig) else dict(logger_cfg)
    for key in ("name", "group"):
        if key in cfg and cfg[key] in (None, "") and identity.get(key):
            cfg[key] = identity[key]
    if "tags" in cfg:
        cfg["tags"] = list(dict.fromkeys([*identity.get("tags", []), *(cfg["tags"] or [])]))
    return cfg
