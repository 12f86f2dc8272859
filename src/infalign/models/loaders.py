"""Model and reward configs to loader calls.

Each ``conf/model/*.yaml`` and ``conf/reward/*.yaml`` names a loader function in ``_target_``; the loaders
return ``(model, tokenizer, cache entry)`` (policies) or ``(reward model, cache entry)`` (rewards). The keys a
config of each loader may hold, with their types and ranges, are defined once, torch-free, in
:mod:`infalign.config.models` (checked with the rest of the config before torch is imported). :func:`call_loader`
builds the loader with ``hydra.utils.instantiate(cfg, _partial_=True)`` and calls it with the runtime objects
(data config, record lists, cache root) that a config cannot hold and that its ``RUNTIME`` names.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from infalign.config.check import check_loader_keys, source
from infalign.config.models import RUNTIME, TRAINER_KEYS
from infalign.runtime import signals
from infalign.runtime.model_paths import PATH_KEYS, model_path_problem

__all__ = ["PromptFormat", "call_loader", "check_loader_config", "model_path_problem", "PATH_KEYS"]

PromptFormat = Literal["raw", "chat"]  # raw: the HH text as it is | chat: the tokenizer's chat template
_WHAT = {"model": "the reference policy", "reward": "the reward model"}  # named by a stop signal's message


def check_loader_config(cfg: Mapping[str, Any], group: str, source_file: str | None = None) -> dict | None:
    """Refuse (ConfigError, one line naming ``source_file``) a model / reward config with an unknown key, a value
    out of range or a required key unset; returns its loader's keys (None: a loader infalign does not define,
    whose keys are all passed)."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return check_loader_keys(values, group, source_file or source(group, None))


def call_loader(cfg: Mapping[str, Any], group: str, **runtime: Any) -> Any:
    """``instantiate(cfg, _partial_=True)`` called with the runtime objects the loader's dataclass names. `cfg` was
    checked with the run's config (or by the build CLI): it is not checked again here."""
    from hydra.utils import instantiate

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    skip = TRAINER_KEYS[group]
    loader = instantiate({k: v for k, v in values.items() if k not in skip}, _partial_=True, _convert_="all")
    accepted = RUNTIME.get(values["_target_"], ())
    with signals.stage(f"loading {_WHAT[group]} ({group}={cfg.get('name') or cfg['_target_']})"):
        return loader(**{k: v for k, v in runtime.items() if k in accepted})
