"""The schema's warnings (valid values that lose a diagnostic or some speed) and its entry points:
`check_config`, `check_run_options`, `report_warnings`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from omegaconf import OmegaConf

from infalign.runtime.schema.cross import CROSS_RULES
from infalign.runtime.schema.fields import _check_key, _check_known_keys, _plain
from infalign.runtime.schema.files import _check_cache_root, _check_model_paths
from infalign.runtime.schema.keys import KEYS
from infalign.runtime.schema.rules import ConfigError, _int, _real

log = logging.getLogger("infalign.config")


# ---------------------------------------------------------------------------------------------- warnings
def optimizer_steps(c: Mapping) -> int:
    """Optimizer steps of the whole run (infalign.trainer.module.InfAlignModule.optimizer_steps, from the config)."""
    rl, distill = c["rl"], c["distill"]
    per_rl = (rl["ppo_epochs"] if rl["algo"] == "ppo" else 1) * (rl["prompts_per_iteration"] * rl["k"]
                                                               // rl["minibatch_size"])
    per_distill = rl["prompts_per_iteration"] * distill["samples_per_prompt"] // rl["minibatch_size"]
    return (rl["iterations"] - distill["iterations"]) * per_rl + distill["iterations"] * per_distill


def _warmup_outlasts_the_run(c, **_) -> str | None:
    warmup, steps = (c.get("scheduler") or {}).get("warmup_steps"), optimizer_steps(c)
    if _int(warmup) and warmup >= steps:
        return (f"scheduler.warmup_steps={warmup} is not below the run's {steps} optimizer steps: the learning rate "
                f"never reaches optimizer.lr; e.g. scheduler.warmup_steps={steps // 10}")
    return None


def _noise_scale_needs_two_minibatches(c, **_) -> str | None:
    rl = c["rl"]
    if rl["grad_noise_scale"] and rl["iterations"] > c["distill"]["iterations"] and \
            rl["prompts_per_iteration"] * rl["k"] // rl["minibatch_size"] < 2:
        return ("rl.grad_noise_scale=true logs nothing: it needs >= 2 minibatches per rollout, and "
                f"rl.minibatch_size={rl['minibatch_size']} takes all {rl['prompts_per_iteration'] * rl['k']} sequences "
                "of one; halve rl.minibatch_size or set rl.grad_noise_scale=false")
    return None


def _lora_dropout_with_ppo(c, **_) -> str | None:
    lora = (c.get("model") or {}).get("lora") or {}
    dropout = lora.get("dropout", 0) if isinstance(lora, Mapping) else 0
    if c["rl"]["algo"] == "ppo" and _real(dropout) and dropout > 0 and _int(lora.get("r")) and lora["r"] > 0:
        return (f"model.lora.dropout={dropout} with rl.algo=ppo: dropout in the update's passes perturbs PPO's "
                "probability ratio; e.g. model.lora.dropout=0")
    return None


def _allow_changes_without_resume(c, **_) -> str | None:
    if c.get("resume_allow_changes") and c["resume"] is False:
        return "resume_allow_changes=true does nothing without resume=true or resume=auto"
    return None


def _more_threads_than_cores(c, **_) -> str | None:
    threads, cores = c.get("num_threads"), os.cpu_count()
    if _int(threads) and cores and threads > cores:
        return (f"num_threads={threads} exceeds the {cores} CPU cores here: the threads share them and run slower; "
                f"e.g. num_threads={cores}")
    return None


WARNINGS = (_warmup_outlasts_the_run, _noise_scale_needs_two_minibatches, _lora_dropout_with_ppo,
            _allow_changes_without_resume, _more_threads_than_cores)


# ---------------------------------------------------------------------------------------------- entry points
def check_run_options(cfg) -> None:
    """`resume`, `overwrite`, `resume_allow_changes` and `checkpoint.every` alone (infalign.trainer.checkpointing)."""
    _run_options(_plain(cfg))


def _run_options(c: Mapping) -> None:
    for path in ("resume", "overwrite", "resume_allow_changes", "checkpoint.every"):
        _check_key(c, path, KEYS[path])
    if c["resume"] is not False and c["overwrite"]:
        raise ConfigError("resume and overwrite=true contradict each other: resume continues the run in "
                          "hydra.run.dir, overwrite replaces it; pass one of them")


def check_config(cfg, choices: Mapping | None = None, *, multirun: bool = False) -> list[str]:
    """Check every key of `python train.py`'s config, the files it names and the rules between them; raise
    `ConfigError` on the first refused value, return the warnings (values that are valid but lose something).

    `choices`: Hydra's group choices (`HydraConfig.get().runtime.choices`), named in the messages; `multirun`:
    a `-m` sweep member."""
    choices = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else choices
    c = _plain(cfg)
    _check_known_keys(c, choices)
    for path, key in KEYS.items():
        _check_key(c, path, key)
    _check_model_paths(c)  # a key's own value too (before the rules between keys: model=hf with scale=smoke)
    _run_options(c)
    for rule in CROSS_RULES:
        rule(c, choices=choices, multirun=multirun)
    cache_warning = _check_cache_root(c)  # last: it creates the folder, which a refused config must not
    return [w for w in (*(rule(c) for rule in WARNINGS), cache_warning) if w]


_shown: set[str] = set()


def report_warnings(warnings: list[str]) -> None:
    """Log each warning once per process (train.py checks first, then run() checks again)."""
    for message in warnings:
        if message not in _shown:
            _shown.add(message)
            log.warning("%s", message)
