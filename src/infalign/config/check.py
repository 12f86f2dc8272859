"""The check of a composed config, in one pass before torch is imported: every key against its definition (schema,
models), the files it names, the presets, the rules between keys (between), then the warnings: valid values that
lose a diagnostic or some speed. A refused value is one line (ConfigError)."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from infalign.config.between import batches_fit, choices_fit, samples_fit, trainer_fits
from infalign.config.models import LOADERS
from infalign.config.rules import is_int, show
from infalign.config.schema import DATA, RUN, TRAINER, Section
from infalign.runtime.artifacts import CACHE_FIX, cache_root_warning
from infalign.runtime.atomic import FileWriteError
from infalign.runtime.errors import ConfigError
from infalign.runtime.model_paths import PATH_KEYS, model_path_problem
from infalign.runtime.presets import check_presets

log = logging.getLogger("infalign.config")
GROUPS = ("data", "model", "reward", "calibrator", "transform", "trainer", "logger", "solver", "study", "hydra")
OPEN = ("optimizer", "scheduler", "trainer")  # their classes' other parameters: check_targets, once torch is imported
HINTS = {"lr": "optimizer.lr", "learning_rate": "optimizer.lr", "weight_decay": "optimizer.weight_decay",
         "betas": "optimizer.betas", "epochs": "rl.iterations", "max_epochs": "rl.iterations",
         "batch_size": "rl.minibatch_size", "max_new_tokens": "generation.max_new_tokens", "seed": "seed"}
MOVED = {f"calibration.{k}": f"data.{k}" for k in ("train_prompts", "eval_prompts", "eval_partition")}
REMOVED = {"generation.sampler": "every token is drawn by inverse CDF, exactly from the policy",
           "generation.cache_implementation": "the sampler keeps its own KV cache"}


def source(group: str, choices: Mapping | None, *, scale: bool = False) -> str:
    """The file a group's keys come from, as a message names it."""
    choice, preset = (choices or {}).get(group), (choices or {}).get("scale")
    if not choice:
        return f"the {group} config (conf/{group}/)"
    return f"conf/{group}/{choice}.yaml" + (f" (as composed with conf/scale/{preset}.yaml)" if scale and preset else "")


def old_key(path: str, value) -> ConfigError | None:
    """The refusal of a key that moved or was removed (one release), naming the fix."""
    if path in REMOVED:
        return ConfigError(f"{path} was removed ({REMOVED[path]}); drop it")
    if path in MOVED:
        return ConfigError(f"{path} moved to {MOVED[path]}; e.g. {MOVED[path]}={value}")
    return None


def moved_keys(overrides) -> None:
    """train.py, before Hydra composes (which would say only that `+` appends): the old names refused."""
    for name, _, value in (str(o).lstrip("+~").partition("=") for o in overrides):
        if error := old_key(name, value):
            raise error


def _unknown(path: str, where: str, known, value) -> ConfigError:
    if error := old_key(path, value):
        return error
    leaf = path.rsplit(".", 1)[-1]
    if leaf in HINTS and path != HINTS[leaf]:
        hint = f"; {leaf} is set as {HINTS[leaf]}"
    else:
        close = difflib.get_close_matches(leaf, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    if path.startswith("generation."):
        hint += f"; rollouts sample from the policy itself: {path}={show(value)} would change the sampling distribution"
    return ConfigError(f"{path}: unknown key in {where}; known keys: {', '.join(sorted(known))}{hint}")


def check_section(node, keys: dict, path: str, where: str, every: bool = False) -> None:
    """`node` (plain data) against `keys`: no unknown key (in an open section: check_targets), every key's rule,
    the required keys set (`every`: all of them, the run's), the nested sections in turn."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{path} must be a mapping of its keys ({where}), got {show(node)}")
    at = f"{path}." if path else ""
    for name in node:
        if name not in keys and path not in OPEN and not (name.startswith("_") and name.endswith("_")):
            raise _unknown(at + name, where, keys, node[name])
    for name, spec in keys.items():
        full, value = at + name, node.get(name, "???")
        if isinstance(value, str) and value == "???":  # absent, or Hydra's mandatory value
            if spec.req or every:
                example = f"; e.g. {full}={spec.shown}" if not isinstance(spec, Section) else ""
                raise ConfigError(f"{full} must be set ({spec.help}; {where}){example}")
        elif isinstance(spec, Section):
            if value is not None or not spec.nullable:
                check_section(value, spec.keys, full, where if path else f"the {name} config ({where})", every)
        elif not spec.rule.test(value):
            raise ConfigError(f"{full} must be {spec.rule.allowed} ({spec.help}), got {show(value)}; "
                              f"e.g. {full}={spec.shown}")


def check_loader_keys(node, group: str, where: str) -> dict | None:
    """A group's config against the keys of the function its `_target_` names (its loader), which it returns (None:
    one infalign does not define). A path that names no usable model is refused first (a hub id is left to the hub).
    """
    if not isinstance(node, Mapping) or not node.get("_target_"):
        raise ConfigError(f"{group}: the config has no _target_ (use a file from conf/{group}/): {show(node)}")
    for name in PATH_KEYS:
        if name in node and node[name] != "???" and (problem := model_path_problem(f"{group}.{name}", node[name])):
            raise ConfigError(problem)
    keys = LOADERS[group].get(str(node["_target_"]))
    if keys is not None:
        check_section(node, keys, group, where)
    return keys


def plain(cfg) -> dict:
    """The config as plain data, interpolations resolved; without `logger` and `hydra` (Hydra's runtime)."""
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("logger", "hydra")]),
                                      resolve=True)
    except OmegaConfBaseException as e:  # e.g. study.beta_index outside a method's beta grid
        reason = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{e.full_key} cannot be resolved: {reason}") from None


# ---------------------------------------------------------------------------------------------- warnings
def optimizer_steps(c: Mapping) -> int:
    """Optimizer steps of the whole run (as infalign.trainer.module.InfAlignModule.optimizer_steps counts them)."""
    rl, distill = c["rl"], c["distill"]
    per_rl = (rl["ppo_epochs"] if rl["algo"] == "ppo" else 1) * -(-rl["prompts_per_iteration"] * rl["k"]
                                                                 // rl["minibatch_size"])
    per_distill = -(-rl["prompts_per_iteration"] * distill["samples_per_prompt"] // distill["minibatch_size"])
    return (rl["iterations"] - distill["iterations"]) * per_rl + distill["iterations"] * per_distill


def warnings(c: Mapping) -> list[str]:
    out, rl, steps = [], c["rl"], optimizer_steps(c)
    warmup, cores, threads = (c["scheduler"] or {}).get("warmup_steps"), os.cpu_count(), c["num_threads"]
    lora = c["model"].get("lora") or {}
    if is_int(warmup) and warmup >= steps:
        out.append(f"scheduler.warmup_steps={warmup} is not below the run's {steps} optimizer steps: the learning "
                   f"rate never reaches optimizer.lr; e.g. scheduler.warmup_steps={steps // 10}")
    if rl["grad_noise_scale"] and rl["iterations"] > c["distill"]["iterations"] and \
            rl["prompts_per_iteration"] * rl["k"] // rl["minibatch_size"] < 2:
        out.append("rl.grad_noise_scale=true logs nothing: it needs >= 2 minibatches per rollout, and "
                   f"rl.minibatch_size={rl['minibatch_size']} takes all {rl['prompts_per_iteration'] * rl['k']} "
                   "sequences of one; halve rl.minibatch_size or set rl.grad_noise_scale=false")
    if rl["algo"] == "ppo" and lora.get("r") and lora.get("dropout", 0) > 0:
        out.append(f"model.lora.dropout={lora['dropout']} with rl.algo=ppo: dropout in the update's passes perturbs "
                   "PPO's probability ratio; e.g. model.lora.dropout=0")
    if c["resume_allow_changes"] and c["resume"] is False:
        out.append("resume_allow_changes=true does nothing without resume=true or resume=auto")
    if is_int(threads) and cores and threads > cores:
        out.append(f"num_threads={threads} exceeds the {cores} CPU cores here: the threads share them and run "
                   f"slower; e.g. num_threads={cores}")
    return out


def _cache_root(root: str) -> str | None:
    """`cache_root` can be written (created if absent: so this comes last), or holds entries (a shared cache)."""
    try:
        return cache_root_warning(root)
    except OSError as e:  # FileWriteError names the folder, the cause and the way out; else: a file, or under one
        cause = "it is a file" if os.path.isfile(root) else e.strerror
        raise ConfigError(str(e) if isinstance(e, FileWriteError) else f"cache_root={root} cannot be the cache "
                          f"directory: {cause}; {CACHE_FIX}") from e


def check_config(cfg, choices: Mapping | None = None, *, multirun: bool = False, overrides=None) -> list[str]:
    """Raise `ConfigError` (one line) on the first refused value, return the warnings. `choices`: Hydra's group
    choices (named in the messages; the presets are checked when given); `overrides`: the command line's (default:
    Hydra's); `multirun`: a -m member."""
    from hydra.core.hydra_config import HydraConfig

    choices = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else choices
    c = plain(cfg)
    check_section({k: v for k, v in c.items() if k not in GROUPS}, RUN, "", "conf/train.yaml", every=True)
    check_section(c.get("data"), DATA, "data", source("data", choices))
    check_section(c.get("trainer"), TRAINER, "trainer", source("trainer", choices))
    for group in LOADERS:
        check_loader_keys(c.get(group), group, source(group, choices, scale=group in ("model", "reward")))
    if choices is not None:  # each key's own value first, then the presets
        if overrides is None:
            overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        check_presets(choices, overrides)
    choices_fit(c, choices)
    samples_fit(c)
    batches_fit(c, multirun)
    trainer_fits(c)
    return [*warnings(c), *filter(None, [_cache_root(c["cache_root"])])]  # last: it creates the folder


def check_targets(cfg, choices: Mapping | None = None) -> None:
    """Once torch can be imported (run(), before any model): the open sections' other keys against their class's
    parameters (Lightning's Trainer, the optimizer, the schedule)."""
    import inspect

    from hydra.utils import get_method

    for section in OPEN:
        node = cfg.get(section)
        if not node or not node.get("_target_"):
            continue
        params = inspect.signature(get_method(node["_target_"])).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        where = (source("trainer", choices) if section == "trainer"
                 else f"the {section} config (conf/train.yaml: {node['_target_']}'s parameters)")
        for name in node:
            if name not in params and not (name.startswith("_") and name.endswith("_")):
                raise _unknown(f"{section}.{name}", where, params, node[name])


def report(warnings: list[str]) -> None:
    for message in warnings:
        log.warning("%s", message)
