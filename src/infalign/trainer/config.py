"""`validate_config`: every check of `python train.py`'s config that needs no model, in one place.

`infalign.trainer.run.run` calls it first, so a bad value is refused in seconds, naming the key, before any
data is read or model built. Most rules are the schema's (`infalign.runtime.schema`, which `train.py` also
applies before importing torch); here are the ones that need torch-importing modules: a model or reward
config's keys against its loader's signature (`infalign.models.loaders`), LoRA's settings and peft
(`infalign.models.lora`), and the generation keys that are transformers' `GenerationConfig` fields
(`infalign.models.pure_sampling`). Their errors are raised as `ConfigError` too, so `train.py` prints them
as one line.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from infalign.models.loaders import check_loader_config
from infalign.models.lora import check_gradient_checkpointing, check_lora_settings
from infalign.models.pure_sampling import PURE_SAMPLING, sampling_kwargs
from infalign.runtime.schema import KEYS, RL_ALGOS, ConfigError, check_config, processes, report_warnings

__all__ = ["RL_ALGOS", "ConfigError", "processes", "validate_config"]

# generation keys the schema knows, plus every GenerationConfig field sampling_kwargs sets to its neutral value
GENERATION_KEYS = frozenset({p.split(".", 1)[1] for p in KEYS if p.startswith("generation.")}
                            | {"temperature", "top_k", "top_p"} | set(PURE_SAMPLING))


def _source(group: str, choices: Mapping | None) -> str | None:
    """Where a group's config came from, for the messages: its file, and the scale preset that sets its sizes."""
    choice, scale = (choices or {}).get(group), (choices or {}).get("scale")
    if not choice:
        return None
    return f"conf/{group}/{choice}.yaml" + (f" (as composed with conf/scale/{scale}.yaml)" if scale else "")


def _check_models(cfg: DictConfig, choices: Mapping | None) -> None:
    """The model and reward configs: known keys only (an unknown one is a typo that would be dropped), values
    in range, required ones set."""
    check_loader_config(cfg.model, "model", _source("model", choices))
    check_lora_settings(cfg.model.get("lora"))  # values in range; peft installed when LoRA is on
    check_gradient_checkpointing(cfg.model.get("gradient_checkpointing", False))
    check_loader_config(cfg.reward, "reward", _source("reward", choices))


def _check_generation(gen) -> None:
    """`generation`: no key that sampling would ignore, and no GenerationConfig field that changes the samples."""
    for key in gen:
        if key not in GENERATION_KEYS:
            raise ConfigError(f"generation.{key}: unknown key in the generation config (conf/train.yaml); it is "
                              "neither one of infalign's (max_new_tokens, sampler, cache_implementation) nor a "
                              "transformers GenerationConfig field")
    sampling_kwargs(gen, for_training=True)


def validate_config(cfg: DictConfig, choices: Mapping | None = None, *, multirun: bool = False) -> None:
    """Every check that needs no model: one-line errors (`ConfigError`) naming the key, before heavy compute.

    `choices`: Hydra's group choices (`hydra.runtime.choices`), named in the messages; `multirun`: a `-m` sweep."""
    choices = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else choices
    report_warnings(check_config(cfg, choices, multirun=multirun))  # the schema: every rule that needs no torch
    try:
        _check_generation(cfg.generation)
        _check_models(cfg, choices)
    except ConfigError:
        raise
    except ValueError as e:  # the same kind of error as the schema's: train.py prints it as one line
        raise ConfigError(str(e)) from e
