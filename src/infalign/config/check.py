"""The check of a composed config, in one pass before torch is imported: every key against its definition
(infalign.config.schema, .models), the files it names, the presets (infalign.runtime.presets), the rules between
keys (each written once, in infalign.config.cross), and the warnings (valid values that lose a diagnostic or some
speed)."""

from __future__ import annotations

import difflib
import errno
import logging
import os
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from infalign.config.cross import check_between
from infalign.config.models import LOADERS
from infalign.config.rules import is_int, is_real, show
from infalign.config.schema import TRANSFORMS, DataConfig, TrainConfig, TrainerConfig
from infalign.runtime.artifacts import CACHE_FIX, cache_root_warning
from infalign.runtime.atomic import FileWriteError
from infalign.runtime.errors import ConfigError
from infalign.runtime.model_paths import PATH_KEYS, model_path_problem
from infalign.runtime.presets import check_presets

log = logging.getLogger("infalign.config")
GROUPS = ("data", "model", "reward", "calibrator", "transform", "trainer", "logger", "solver", "study", "hydra")
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
HINTS = {"lr": "optimizer.lr", "learning_rate": "optimizer.lr", "weight_decay": "optimizer.weight_decay",
         "betas": "optimizer.betas", "epochs": "rl.iterations", "max_epochs": "rl.iterations",
         "batch_size": "rl.minibatch_size", "max_new_tokens": "generation.max_new_tokens", "seed": "seed"}
MOVED = {f"calibration.{k}": f"data.{k}" for k in ("train_prompts", "eval_prompts", "eval_partition")}  # one release
RETIRED = {("rl.kl_penalty", "loss"): "rl.kl_penalty=loss (k3 per token in the loss) is gone: its fixed point is not "
           "the tilted reference pi_ref exp(Phi/beta). Use rl.kl_penalty=exact (the full-vocabulary KL per token in "
           "the loss, with the KL still to come in the advantage) or reward (k1 per sequence in the reward)"}


def source(group: str, choices: Mapping | None, *, scale: bool = False) -> str:
    choice, preset = (choices or {}).get(group), (choices or {}).get("scale")
    if not choice:
        return f"the {group} config (conf/{group}/)"
    return f"conf/{group}/{choice}.yaml" + (f" (as composed with conf/scale/{preset}.yaml)" if scale and preset else "")


def _unknown(path: str, where: str, known, value=MISSING) -> ConfigError:
    leaf = path.rsplit(".", 1)[-1]
    if path in MOVED:
        return ConfigError(f"{path} moved to {MOVED[path]}; e.g. {MOVED[path]}={value}")
    if leaf in HINTS and not path.startswith(HINTS[leaf].rsplit(".", 1)[0] + ".") and path != HINTS[leaf]:
        hint = f"; {leaf} is set as {HINTS[leaf]}"
    else:
        close = difflib.get_close_matches(leaf, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    if path.startswith("generation."):
        hint += f"; rollouts sample from the policy itself: {path}={show(value)} would change the sampling distribution"
    return ConfigError(f"{path}: unknown key in {where}; known keys: {', '.join(sorted(known))}{hint}")


def moved_keys(arguments) -> None:
    """The command line's old names of moved keys, refused before Hydra composes (it would say only `+` appends)."""
    for arg in arguments:
        name, _, value = str(arg).partition("=")
        if name.lstrip("+~") in MOVED:
            raise _unknown(name.lstrip("+~"), "", (), value)


def check_section(node, cls: type, path: str, where: str) -> None:
    """`node` (plain data) against dataclass `cls`: no unknown key (unless `cls.open`), every key's rule, required
    keys set, nested sections in turn."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{path} must be a mapping of its keys ({where}), got {show(node)}")
    known, at = {f.name: f for f in fields(cls)}, f"{path}." if path else ""
    for name in node:
        if name not in known and not getattr(cls, "open", False) and name not in HYDRA_KEYS:
            raise _unknown(f"{at}{name}", where, known, node[name])
    for name, f in known.items():
        full, meta, value = f"{at}{name}", f.metadata, node.get(name, MISSING)
        if value is MISSING or value == "???":
            if not meta.get("opt") and f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{full} must be set ({meta['help']}; {where}); e.g. {full}={meta.get('example')}")
        elif "section" in meta:
            if value is not None or not meta["nullable"]:
                check_section(value, meta["section"], full, where if path else f"the {name} config ({where})")
        elif isinstance(value, str) and (full, value) in RETIRED:
            raise ConfigError(RETIRED[(full, value)])
        elif not meta["rule"].test(value):
            raise ConfigError(f"{full} must be {meta['rule'].allowed} ({meta['help']}), got {show(value)}; "
                              f"e.g. {full}={meta['example']}")


def check_loader_keys(node, group: str, where: str) -> type | None:
    """A model or reward config against its loader's dataclass (None: a loader infalign does not define)."""
    if not isinstance(node, Mapping) or not node.get("_target_"):
        raise ConfigError(f"{group}: the config has no _target_ (use a file from conf/{group}/): {show(node)}")
    for name in PATH_KEYS:  # a path that names no usable model (a hub id is left to the hub), before other keys
        if name in node and node[name] != "???" and (problem := model_path_problem(f"{group}.{name}", node[name])):
            raise ConfigError(problem)
    cls = LOADERS[group].get(str(node["_target_"]))
    if cls is not None:
        check_section(node, cls, group, where)
    return cls


def plain(cfg) -> dict:
    """The config as plain data, interpolations resolved; `logger` and `hydra` unresolved (Hydra's runtime)."""
    out, unresolved = {}, OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    for name in cfg:
        if name in ("logger", "hydra"):
            out[name] = unresolved[name]
            continue
        try:
            node = cfg[name]
            out[name] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except OmegaConfBaseException as e:  # e.g. study.beta_index outside a method's beta grid
            reason = str(getattr(e, "msg", None) or e).splitlines()[0]
            raise ConfigError(f"{getattr(e, 'full_key', None) or name} cannot be resolved: {reason}") from None
    return out


def _keys(c: Mapping, choices: Mapping | None) -> None:
    top = {f.name: f for f in fields(TrainConfig)}
    for name in c:
        if name not in top and name not in GROUPS:
            raise _unknown(name, "the config (conf/train.yaml and its groups)", [*top, *GROUPS], c[name])
    check_section({k: c[k] for k in top if k in c}, TrainConfig, "", "conf/train.yaml")
    check_section(c.get("data"), DataConfig, "data", source("data", choices))
    check_section(c.get("trainer"), TrainerConfig, "trainer", source("trainer", choices))
    transform = c.get("transform") or {}
    if isinstance(transform, Mapping) and transform.get("_target_") in TRANSFORMS:
        check_section(transform, TRANSFORMS[transform["_target_"]], "transform", source("transform", choices))
    for group in ("model", "reward"):
        check_loader_keys(c.get(group), group, source(group, choices, scale=True))


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
    warmup, cores, threads = (c.get("scheduler") or {}).get("warmup_steps"), os.cpu_count(), c["num_threads"]
    lora = c["model"].get("lora") or {}
    if is_int(warmup) and warmup >= steps:
        out.append(f"scheduler.warmup_steps={warmup} is not below the run's {steps} optimizer steps: the learning "
                   f"rate never reaches optimizer.lr; e.g. scheduler.warmup_steps={steps // 10}")
    if rl["grad_noise_scale"] and rl["iterations"] > c["distill"]["iterations"] and \
            rl["prompts_per_iteration"] * rl["k"] // rl["minibatch_size"] < 2:
        out.append("rl.grad_noise_scale=true logs nothing: it needs >= 2 minibatches per rollout, and "
                   f"rl.minibatch_size={rl['minibatch_size']} takes all {rl['prompts_per_iteration'] * rl['k']} "
                   "sequences of one; halve rl.minibatch_size or set rl.grad_noise_scale=false")
    if rl["algo"] == "ppo" and is_real(lora.get("dropout", 0)) and lora.get("dropout", 0) > 0 and lora.get("r"):
        out.append(f"model.lora.dropout={lora['dropout']} with rl.algo=ppo: dropout in the update's passes perturbs "
                   "PPO's probability ratio; e.g. model.lora.dropout=0")
    if c.get("resume_allow_changes") and c["resume"] is False:
        out.append("resume_allow_changes=true does nothing without resume=true or resume=auto")
    if is_int(threads) and cores and threads > cores:
        out.append(f"num_threads={threads} exceeds the {cores} CPU cores here: the threads share them and run "
                   f"slower; e.g. num_threads={cores}")
    return out


def _cache_root(root: str) -> str | None:
    """`cache_root` can be written (created if absent: so this comes last), or holds entries (a shared cache)."""
    try:
        return cache_root_warning(root)
    except FileWriteError as e:  # names the folder, the cause and the way out
        raise ConfigError(str(e)) from e
    except OSError as e:  # not a folder: a file, or under one
        cause = "it is a file" if Path(root).is_file() else f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
        raise ConfigError(f"cache_root={root} cannot be the cache directory: {cause}; {CACHE_FIX}") from e


def check_config(cfg, choices: Mapping | None = None, *, multirun: bool = False, overrides=None) -> list[str]:
    """Check the composed config once, before torch: raise `ConfigError` (one line) on the first refused value,
    return the warnings (valid values that lose something). `choices`: Hydra's group choices (named in the
    messages; the presets are checked when given); `overrides`: the command line's (default: Hydra's);
    `multirun`: a -m member."""
    from hydra.core.hydra_config import HydraConfig

    choices = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else choices
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    c = plain(cfg)
    _keys(c, choices)
    if choices is not None:  # each key's own value first, then the presets
        check_presets(choices, list(overrides))
    check_between(c, choices, multirun)
    return [*warnings(c), *filter(None, [_cache_root(c["cache_root"])])]  # last: it creates the folder


def check_targets(cfg, choices: Mapping | None = None) -> None:
    """Once torch can be imported (run(), before any model): the open sections' other keys against their class's
    parameters (Lightning's Trainer, the optimizer, the schedule), each class its own source."""
    import inspect

    from hydra.utils import get_method

    for section in ("trainer", "optimizer", "scheduler"):
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
