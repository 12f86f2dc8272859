"""The schema of `python train.py`'s config: every key a user can set (its type, range, meaning and an example)
and the rules between keys, checked before torch, Lightning or any model is imported.

Why a module of its own that imports the standard library and omegaconf only: `train.py` applies it first, so
a bad value fails about a second after the command (Hydra's start-up included) instead of after the ~10 s that
importing torch and Lightning takes, or after the models were built. `infalign.trainer.config.validate_config`
calls it too, so an in-process `run(cfg)` gets the same checks, then adds the few that need torch-importing
modules (a model or reward config's keys against its loader's signature, LoRA's peft, the generation keys
that are `GenerationConfig` fields).

A refused value raises `ConfigError`: one line naming the key, what is allowed, the value and an example.
A value that is valid but pointless is an error where the run would spend its time for nothing
(`optimizer.lr=0` trains nothing) and a warning where it only loses a diagnostic or some speed
(`check_config` returns them). README, "Errors you may see", lists both.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["KEYS", "ConfigError", "Key", "check_config", "check_run_options", "optimizer_steps", "processes",
           "report_warnings"]

log = logging.getLogger("infalign.config")

SEED_MAX = 2**32 - 1  # Lightning's seed_everything replaces a seed outside [0, 2^32 - 1] by 0, with a warning
# Mirrors of constants that live in torch-importing modules (tests/test_config.py checks that they agree):
RL_ALGOS = ("rloo", "ppo")  # infalign.trainer.module.RLConfig
KL_PENALTY_MODES = ("reward", "exact")  # infalign.core.losses.KL_PENALTY_MODES
PARTITIONS = ("train", "validation", "test")  # infalign.models.data.PARTITIONS
SAMPLERS = ("inverse_cdf", "multinomial")  # infalign.models.pure_sampling.SAMPLERS
# Lightning's precision strings (lightning.fabric.plugins.precision.precision._PRECISION_INPUT), aliases last
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64", 32, 16, 64)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's registry plus its aliases auto, gpu
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


class ConfigError(ValueError):
    """A config value refused: one line naming the key, what is allowed, the value and an example."""


# ---------------------------------------------------------------------------------------------- value rules
@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    allowed: str  # completes "<key> must be ..."


def _show(v) -> str:
    """A value as the message shows it: YAML's true/false/null, strings quoted (so `seed='abc'` reads as text)."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return repr(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, *, integral_float: bool = False) -> Rule:
    """An integer in [lo, hi]; `integral_float`: 4.0 counts as 4 (N, which the theory also takes as a float)."""
    def test(v):
        ok = _int(v) or (integral_float and _real(v) and float(v).is_integer())
        return ok and (lo is None or v >= lo) and (hi is None or v <= hi)
    what = "a positive integer" if lo == 1 and hi is None else "an integer"
    bounds = f" from {lo} to {hi}" if hi is not None else f" >= {lo}" if lo not in (None, 1) else ""
    return Rule(test, what + bounds)


def number(*, gt=None, ge=None, le=None, lt=None) -> Rule:
    """A finite number (an int or a float, not a bool) within the bounds given."""
    def test(v):
        return _real(v) and (gt is None or v > gt) and (ge is None or v >= ge) and \
            (le is None or v <= le) and (lt is None or v < lt)
    if gt == 0 and ge is le is lt is None:
        return Rule(test, "a positive finite number")
    if ge is not None and (le is not None or lt is not None):
        return Rule(test, f"a number in [{ge}, {le}]" if le is not None else f"a number in [{ge}, {lt})")
    bounds = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<=", le), ("<", lt)) if b is not None]
    return Rule(test, " ".join(["a number", *bounds]))


def one_of(*values, text: str | None = None) -> Rule:
    shown = [_show(v) for v in values]
    listed = " or ".join(shown) if len(shown) <= 2 else f"one of {', '.join(shown)}"
    # `True in (1,)` is true in Python: compare types too, so `resume=1` is not `resume=true`
    return Rule(lambda v: any(v == x and type(v) is type(x) for x in values), text or listed)


def nullable(rule: Rule, meaning: str) -> Rule:
    return Rule(lambda v: v is None or rule.test(v), f"null ({meaning}) or {rule.allowed}")


def list_of(rule: Rule, what: str, *, nonempty: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, list) and (bool(v) or not nonempty) and all(rule.test(x) for x in v),
                f"a {'non-empty ' if nonempty else ''}list of {what}")


BOOL = one_of(True, False, text="true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
SEED = integer(0, SEED_MAX)
TARGET = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"[\w.]+", v) is not None, "a dotted import path")
INSTANTIATED = Rule(lambda v: isinstance(v, Mapping) and isinstance(v.get("_target_"), str), "a mapping with _target_")


def _devices(v) -> bool:
    """Lightning's `devices`: a count >= 1, -1 or auto (all), a list of device indices, or such a list as text."""
    if _int(v):
        return v >= 1 or v == -1
    if isinstance(v, list):
        return bool(v) and all(_int(x) and x >= 0 for x in v)
    if isinstance(v, str):
        s = v.replace(" ", "")
        if "," in s:  # "0,1" or "0,": device indices
            return re.fullmatch(r"\d+(,\d+)*,?", s) is not None
        return s in ("auto", "-1") or (s.isdigit() and int(s) >= 1)
    return False


def _fractions(v) -> bool:
    return (isinstance(v, Mapping) and set(v) <= set(PARTITIONS) and all(_real(x) and x >= 0 for x in v.values())
            and abs(sum(v.values()) - 1.0) <= 1e-6)


# ---------------------------------------------------------------------------------------------- the keys
@dataclass(frozen=True)
class Key:
    rule: Rule
    what: str  # what the key is, in the paper's vocabulary
    example: str  # a valid value as typed on the command line
    required: bool = True  # False: may be absent (the code has a default, or only some _target_s take it)


_TOKENS = integer(1)
_DECAY = number(ge=0, lt=1)
KEYS: dict[str, Key] = {
    # the method
    "n": Key(integer(1, integral_float=True), "the N of best-/worst-of-N; n=1 is the standard win rate", "4"),
    "beta": Key(number(gt=0), "the KL strength; with rl.target_kl its starting value", "0.05"),
    "seed": Key(SEED, "the run's seed; Lightning takes 0 to 2^32-1", "0"),
    "method": Key(TEXT, "the method preset's name, conf/method/", "bon_exp", required=False),
    "solver": Key(TEXT, "the solver preset's name, conf/solver/", "rloo", required=False),
    # the run
    "cache_root": Key(TEXT, "the folder of built models and calibration caches", "/data/infalign-cache"),
    "resume": Key(one_of(True, False, "auto", text="true, false or auto"),
                  "continue hydra.run.dir's last checkpoint; auto: if there is one", "auto"),
    "overwrite": Key(BOOL, "start afresh in a run dir that holds a run's outputs", "true"),
    "resume_allow_changes": Key(BOOL, "let resume continue with a changed experiment", "true", required=False),
    "num_threads": Key(nullable(integer(1), "torch's default"),
                       "torch's CPU threads; 0 is no thread count: use null for torch's default", "2"),
    "progress": Key(BOOL, "the progress bar over the iterations", "false"),
    # rl: the policy-gradient solver
    "rl.algo": Key(one_of(*RL_ALGOS), "RLOO, or PPO-clip with several passes over a rollout", "rloo"),
    "rl.k": Key(integer(2), "samples per prompt; the leave-one-out baseline needs another sample", "4"),
    "rl.iterations": Key(integer(1), "RL iterations, one Lightning epoch each: the run's one count of iterations",
                         "30"),
    "rl.prompts_per_iteration": Key(integer(1), "prompts per rollout", "16"),
    "rl.minibatch_size": Key(integer(1), "sequences per optimizer step, over all processes", "32"),
    "rl.ppo_epochs": Key(integer(1), "passes over a rollout with rl.algo=ppo", "2"),
    "rl.clip": Key(number(gt=0), "PPO's clip range of the probability ratio, rl.algo=ppo", "0.2"),
    "rl.grad_clip": Key(nullable(number(ge=0), "no clipping"), "the gradient norm is clipped to it; 0: no clipping",
                        "1.0"),
    "rl.kl_penalty": Key(one_of(*KL_PENALTY_MODES),
                         "reward: k1 KL per sequence in the reward; exact: the full-vocabulary KL per token", "exact"),
    "rl.target_kl": Key(nullable(number(gt=0), "beta stays fixed"), "adapt beta towards this KL, nats per sequence",
                        "6.0"),
    "rl.null_control": Key(BOOL, "shuffle Phi within a prompt's samples: a control that learns nothing", "true"),
    "rl.grad_noise_scale": Key(BOOL, "log the gradient noise scale from the minibatch gradients", "false"),
    # distill: the distillation solver
    "distill.iterations": Key(integer(0), "the first iterations that distil; 0 = off", "0"),
    "distill.m": Key(integer(2), "reference samples per training prompt in the pool; leave-one-out needs 2",
                     "64"),
    "distill.samples_per_prompt": Key(integer(1), "pool samples resampled per prompt and iteration", "4"),
    "distill.prompts_per_batch": Key(integer(1), "prompts per batch while building the pool", "8"),
    # the optimizer (torch.optim.AdamW unless _target_ names another)
    "optimizer._target_": Key(TARGET, "the optimizer class", "torch.optim.AdamW"),
    "optimizer._partial_": Key(one_of(True, text="true"), "the trainer calls it with the trainable parameters",
                               "true"),
    "optimizer.lr": Key(number(gt=0), "the learning rate; 0 would train nothing", "1e-4", required=False),
    "optimizer.betas": Key(Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(map(_DECAY.test, v)),
                                "a list of two numbers in [0, 1)"),
                           "Adam's decay rates of the gradient's moments", "[0.9,0.95]", required=False),
    "optimizer.eps": Key(number(gt=0), "Adam's denominator term", "1e-8", required=False),
    "optimizer.weight_decay": Key(number(ge=0), "decoupled weight decay", "0.01", required=False),
    # the learning-rate schedule (null: constant)
    "scheduler._target_": Key(TARGET, "the schedule factory", "infalign.trainer.schedules.warmup_cosine",
                              required=False),
    "scheduler.warmup_steps": Key(integer(0), "optimizer steps of linear warm-up", "5", required=False),
    "scheduler.final_lr_fraction": Key(number(ge=0, le=1), "the cosine's end, as a fraction of optimizer.lr",
                                       "0.1", required=False),
    # sampling (temperature, top_k, top_p: _pure_sampling below; other GenerationConfig fields: validate_config)
    "generation.max_new_tokens": Key(_TOKENS, "tokens per sampled response: rollouts, calibration cache, evaluation",
                                     "64"),
    "generation.sampler": Key(one_of(*SAMPLERS), "how a token is drawn, both exact", "inverse_cdf", required=False),
    "generation.cache_implementation": Key(nullable(TEXT, "the dynamic KV cache"), "transformers' KV-cache layout",
                                           "static", required=False),
    # the calibration cache
    "calibration.m": Key(integer(1), "reference samples per prompt, M: the calibrated reward's resolution is 1/M",
                         "16"),
    "calibration.train_prompts": Key(integer(1), "training prompts, a seeded subset of the train partition", "128"),
    "calibration.eval_prompts": Key(integer(1), "held-out prompts the win rates are measured on", "48"),
    "calibration.eval_partition": Key(one_of("validation", "test", text="a held-out partition, validation or test"),
                                      "where the evaluation prompts come from", "validation"),
    "calibration.seed": Key(SEED, "the seed of the prompt subset and the reference samples", "0"),
    "calibration.prompts_per_batch": Key(integer(1), "prompts per batch while sampling the cache", "8"),
    # evaluation
    "eval.every": Key(integer(0), "iterations between evaluations; 0: only the final one, which always runs", "15"),
    "eval.ns": Key(list_of(integer(1, integral_float=True), "positive integers"),
                   "the N of best-/worst-of-N evaluated; the run's n is always added", "[1,2,4,8]"),
    "eval.k": Key(integer(1), "policy samples per evaluation prompt, at least the largest N", "16"),
    "eval.prompts_per_batch": Key(integer(1), "evaluation prompts per batch", "8"),
    "eval.log_samples": Key(integer(0), "evaluation prompts whose responses are logged; 0 = off", "8",
                            required=False),
    "checkpoint.every": Key(integer(0), "iterations between checkpoints; 0: only at the end and on a stop signal",
                            "5"),
    # data
    "data.root": Key(TEXT, "the folder of <subset>/<split>.jsonl.gz files", "/data/hh-rlhf"),
    "data.source": Key(one_of("local", "hub", "auto"), "where the pairs are read; auto: local if the file exists",
                       "auto"),
    "data.revision": Key(nullable(TEXT, "the hub's default"), "the hub dataset's revision", "main", required=False),
    "data.subsets": Key(list_of(TEXT, "subset names", nonempty=True), "HH-RLHF subsets read", "[harmless-base]"),
    "data.split": Key(TEXT, "the split file read", "test"),
    "data.fractions": Key(Rule(_fractions, "a mapping of train, validation, test to fractions >= 0 summing to 1"),
                          "the partition by prompt", "{train:0.8,validation:0.1,test:0.1}", required=False),
    "data.seed": Key(SEED, "the seed of the partition by prompt", "0"),
    "data.max_prompt_tokens": Key(_TOKENS, "prompts are cut from the left to this many tokens", "192"),
    "data.max_response_tokens": Key(_TOKENS, "the models' training truncation; changing it rebuilds them", "64"),
    "data.limit": Key(nullable(integer(0), "all"), "pairs read per subset; 0: all", "160", required=False),
    # the Lightning Trainer (iterations, gradient clipping and accumulation: the cross rules below)
    "trainer._target_": Key(TARGET, "the trainer class", "lightning.Trainer"),
    "trainer.accelerator": Key(Rule(lambda v: v in ACCELERATORS or INSTANTIATED.test(v),
                                    f"one of {', '.join(ACCELERATORS)}"), "the device kind", "cpu", required=False),
    "trainer.devices": Key(Rule(_devices, "a count >= 1, -1 or auto (all), or a list of device indices"),
                           "processes per node", "1", required=False),
    "trainer.num_nodes": Key(integer(1), "nodes", "1", required=False),
    "trainer.precision": Key(one_of(*PRECISIONS, text=f"one of {', '.join(map(str, PRECISIONS[:8]))}, or "
                                                      "Lightning's aliases 32, 16, bf16, 64"),
                             "how Lightning computes the policy's update", "bf16-mixed", required=False),
    "trainer.strategy": Key(Rule(lambda v: TEXT.test(v) or INSTANTIATED.test(v), "a name or a mapping with _target_"),
                            "how processes share the work", "ddp", required=False),
    "trainer.log_every_n_steps": Key(integer(1), "steps between logged rows", "1", required=False),
    "trainer.num_sanity_val_steps": Key(integer(-1), "Lightning's sanity check, unused here", "0", required=False),
    "trainer.enable_model_summary": Key(BOOL, "Lightning's model summary", "false", required=False),
    # transforms: the keys their factories take (conf/transform/)
    "transform.t": Key(Rule(lambda v: v == "auto" or (_real(v) and v > 0), "auto or a positive finite number"),
                       "the exp transform's t; auto: the t infalign.theory picks for n and beta", "4", required=False),
    "transform.target_kl": Key(nullable(number(gt=0), "the KL of the optimum at beta"), "the KL that t=auto tunes for",
                               "0.5", required=False),
    "transform.n": Key(integer(1, integral_float=True), "the N the transform is built for", "4", required=False),
    "transform.beta": Key(number(gt=0), "the beta the transform is built for", "0.05", required=False),
    "transform.mode": Key(one_of("bon", "won"), "best-of-N or worst-of-N", "bon", required=False),
    "transform.m": Key(nullable(integer(1), "continuous u"), "the calibration's M", "16", required=False),
    "transform.eps": Key(number(gt=0), "the floor of log(u)", "1e-3", required=False),
}

# Sections whose keys are all known: a key outside them is a typo (it would be dropped, or fail after the models
# were built). `generation` is open here: its other keys are GenerationConfig fields, checked by validate_config.
# `model` and `reward` are checked against their loader's signature by validate_config.
TOP_LEVEL = ("n", "beta", "seed", "method", "solver", "cache_root", "resume", "overwrite", "resume_allow_changes",
             "num_threads", "progress", "rl", "distill", "optimizer", "scheduler", "generation", "calibration", "eval",
             "checkpoint", "data", "model", "reward", "calibrator", "transform", "trainer", "logger", "study", "hydra")
CLOSED = ("rl", "distill", "calibration", "eval", "checkpoint", "data")
# Sections whose keys depend on `_target_`: {section: {target: its keys}}; an unlisted target is not checked.
TARGET_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "optimizer": {  # torch's signatures (tests/test_config.py compares them)
        "torch.optim.AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                              "differentiable", "fused"),
        "torch.optim.Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "maximize", "capturable",
                             "differentiable", "fused", "decoupled_weight_decay"),
    },
    "scheduler": {"infalign.trainer.schedules.warmup_cosine": ("warmup_steps", "final_lr_fraction")},
    "transform": {
        "infalign.theory.factories.bon_exp": ("t", "n", "beta", "target_kl"),
        "infalign.theory.factories.won_exp": ("t", "n", "beta", "target_kl"),
        "infalign.theory.factories.optimal": ("n", "mode", "beta"),
        "infalign.core.transforms.LogTransform": ("m", "eps"),
        "infalign.core.transforms.IdentityTransform": (),
        "infalign.core.transforms.RawTransform": (),
    },
    "trainer": {  # lightning.Trainer's parameters (Lightning 2.6; tests/test_config.py compares them)
        target: ("accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
                 "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
                 "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
                 "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
                 "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches",
                 "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode",
                 "use_distributed_sampler", "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm",
                 "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams", "model_registry")
        for target in ("lightning.Trainer", "lightning.pytorch.Trainer")
    },
}
# Where a misplaced key belongs: `+rl.lr=1e-4` is meant as optimizer.lr
HINTS = {"lr": "optimizer.lr", "learning_rate": "optimizer.lr", "weight_decay": "optimizer.weight_decay",
         "betas": "optimizer.betas", "epochs": "rl.iterations", "max_epochs": "rl.iterations",
         "batch_size": "rl.minibatch_size", "max_new_tokens": "generation.max_new_tokens", "seed": "seed"}
# Values that once meant something, with why they are gone
RETIRED = {
    ("rl.kl_penalty", "loss"): "rl.kl_penalty=loss (k3 per token in the loss) is gone: its fixed point is not the "
    "tilted reference pi_ref exp(Phi/beta). Use rl.kl_penalty=exact (the full-vocabulary KL per token in the loss, "
    "with the KL still to come in the advantage) or reward (k1 per sequence in the reward)",
}
# Trainer arguments `infalign.trainer.run.run` passes itself, which would silently replace the config's
SET_BY_RUN = {"logger": "the logger group (logger=wandb or logger=none)", "callbacks": "infalign's own callbacks",
              "enable_progress_bar": "progress=true|false", "default_root_dir": "hydra.run.dir",
              "use_distributed_sampler": "infalign's sampler, which shards each iteration's prompts",
              "plugins": "infalign's checksummed checkpoint I/O", "enable_checkpointing": "checkpoint.every"}
# Transforms that read the raw reward, and calibrators that calibrate it (the classes' needs_calibration /
# needs_reference; tests/test_config.py compares them)
RAW_TRANSFORMS = ("infalign.core.transforms.RawTransform",)
CALIBRATORS = {"infalign.core.calibration.EmpiricalCalibrator": True, "infalign.core.calibration.PassThroughCalibrator": False}


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


# ---------------------------------------------------------------------------------------------- cross-field rules
def _presets_named_by_file(c, choices, **_) -> None:
    """A method or solver preset's `method` / `solver` value is its file name: the study tables group by it."""
    for group, why in (("method", "a method preset's `method` is its file name (the study grids are indexed by it)"),
                       ("solver", "a solver preset's `solver` is its file name (final_metrics.json and the study "
                                  "tables record it)")):
        choice = (choices or {}).get(group)
        if choice and c.get(group) != choice:
            raise ConfigError(f"conf/{group}/{choice}.yaml sets {group}: {c.get(group)!r}; {why}: set {group}: {choice}")


def _samples_cover_n(c, **_) -> None:
    """The win rate at N needs M >= N reference samples and K >= N policy samples per prompt."""
    ns = sorted({int(x) for x in c["eval"]["ns"]} | {int(c["n"])})
    m, k = c["calibration"]["m"], c["eval"]["k"]
    if m < ns[-1]:
        raise ConfigError(f"calibration.m={m} is below N={ns[-1]}: the win rate at N needs M >= N reference samples "
                          "per prompt; raise calibration.m or lower n / eval.ns")
    if k < ns[-1]:
        raise ConfigError(f"eval.k={k} is below N={ns[-1]}: best-of-N needs K >= N policy samples per prompt; raise "
                          "eval.k or lower n / eval.ns")


def _prompts_fit(c, **_) -> None:
    rl, cal = c["rl"], c["calibration"]
    if rl["prompts_per_iteration"] > cal["train_prompts"]:
        raise ConfigError(f"rl.prompts_per_iteration={rl['prompts_per_iteration']} exceeds calibration.train_prompts="
                          f"{cal['train_prompts']}: an iteration's prompts are drawn from the training prompts; lower "
                          "it or raise calibration.train_prompts")


def _distill_within_iterations(c, **_) -> None:
    it, total = c["distill"]["iterations"], c["rl"]["iterations"]
    if it > total:
        raise ConfigError(f"distill.iterations must be an integer from 0 to rl.iterations={total} (the first of all "
                          f"iterations that distil; 0 = off), got {it}; e.g. distill.iterations={total}")


def _divisors(total: int, multiple: int) -> list[int]:
    return [d for d in range(multiple, total + 1, multiple) if total % d == 0]


def _minibatches_divide(c, **_) -> None:
    """Every optimizer step takes rl.minibatch_size sequences: a remainder would be a smaller, noisier last step
    (16 sequences in minibatches of 7: 7 + 7 + 2). Per process too: with W processes each holds 1/W of the rollout
    and takes minibatch_size / W of every step, and since both divide by W (_processes_share, checked first), its
    share divides exactly when the whole does."""
    rl, distill = c["rl"], c["distill"]
    mb, world = rl["minibatch_size"], processes(c.get("trainer")) or 1
    sizes = []
    if rl["iterations"] > distill["iterations"]:  # RL iterations: a rollout of k samples per prompt
        sizes.append((rl["prompts_per_iteration"] * rl["k"], "rl.prompts_per_iteration x rl.k"))
    if distill["iterations"] > 0:  # distillation iterations: samples_per_prompt pool samples per prompt
        sizes.append((rl["prompts_per_iteration"] * distill["samples_per_prompt"],
                      "rl.prompts_per_iteration x distill.samples_per_prompt"))
    for total, what in sizes:
        if total % mb:
            fits = _divisors(total, world)
            example = max((d for d in fits if d <= mb), default=fits[0] if fits else total)
            raise ConfigError(f"rl.minibatch_size must divide the {what} = {total} sequences of an iteration (else "
                              f"the last optimizer step is a smaller one: {mb} splits them into {-(-total // mb)} "
                              f"steps), got {mb}; e.g. rl.minibatch_size={example}")


def _processes_share(c, *, multirun=False, **_) -> None:
    """Each of W processes takes an equal share of every iteration's prompts and every minibatch."""
    world = processes(c.get("trainer"))
    if multirun and world != 1:
        # Lightning's launcher re-runs the whole command line per process: each would run the whole sweep
        raise ConfigError("a sweep (-m) runs in one process; it cannot start trainer.devices x trainer.num_nodes "
                          "processes per member: sweep with a shell loop over single runs instead")
    if not world or world == 1:
        return
    rl = c["rl"]
    for key in ("prompts_per_iteration", "minibatch_size"):
        if rl[key] % world:
            raise ConfigError(f"rl.{key}={rl[key]} must be divisible by the {world} processes (trainer.devices x "
                              f"trainer.num_nodes): each takes an equal share; e.g. rl.{key}={world * -(-rl[key] // world)}")


def _iterations_one_source(c, **_) -> None:
    """rl.iterations is the run's only count of iterations: one Lightning epoch each, and the schedule, the
    evaluation and resume read it. Lightning's own limits would stop or extend the run behind its back."""
    trainer, iterations = c.get("trainer") or {}, c["rl"]["iterations"]
    fix = f"set rl.iterations instead (the number of RL iterations, one Lightning epoch each; now {iterations})"
    epochs = trainer.get("max_epochs", _ABSENT)
    if epochs != iterations:
        shown = "absent (Lightning's default: 1000)" if epochs is _ABSENT else _show(epochs)
        raise ConfigError(f"trainer.max_epochs={shown} differs from rl.iterations={iterations}: {fix}, and leave "
                          "trainer.max_epochs at ${rl.iterations}")
    for key, neutral in (("max_steps", (-1, None)), ("min_epochs", (None,)), ("min_steps", (None,)),
                         ("max_time", (None,)), ("fast_dev_run", (False, None, 0)),
                         ("limit_train_batches", (None, 1, 1.0))):
        value = trainer.get(key)
        if not any(value == x and type(value) is type(x) for x in neutral):
            raise ConfigError(f"trainer.{key}={_show(value)} would change the number or length of the iterations: "
                              f"{fix}; remove trainer.{key}")


def _manual_optimisation(c, **_) -> None:
    """The RL update steps the optimizer itself (Lightning's manual optimisation: one step per minibatch), so
    Lightning's automatic accumulation and clipping cannot apply; Lightning would refuse them after the models
    were built and the calibration cache sampled."""
    trainer = c.get("trainer") or {}
    acc = trainer.get("accumulate_grad_batches")
    if acc not in (None, 1) or isinstance(acc, bool):
        raise ConfigError(f"trainer.accumulate_grad_batches={_show(acc)}: the RL update takes one optimizer step "
                          "per rl.minibatch_size sequences itself (manual optimisation), so Lightning cannot "
                          "accumulate; for larger steps raise rl.minibatch_size (e.g. rl.minibatch_size="
                          f"{c['rl']['minibatch_size'] * (acc if _int(acc) and acc > 1 else 2)}) and remove "
                          "trainer.accumulate_grad_batches")
    for key in ("gradient_clip_val", "gradient_clip_algorithm"):
        if trainer.get(key) is not None:
            raise ConfigError(f"trainer.{key}={_show(trainer[key])}: the RL update clips the gradient norm itself "
                              "(manual optimisation); set rl.grad_clip instead (e.g. rl.grad_clip=1.0) and remove "
                              f"trainer.{key}")
    for key, use in SET_BY_RUN.items():
        if key in trainer:
            raise ConfigError(f"trainer.{key}={_show(trainer[key])}: infalign sets it (to {use}); remove "
                              f"trainer.{key}")


_NEUTRAL = {  # generation keys at the values that leave the policy's distribution as it is (as sampling_kwargs reads them)
    "temperature": (lambda v: _real(v) and v == 1, "1.0"),
    "top_k": (lambda v: v is None or (_real(v) and v == 0), "0"),
    "top_p": (lambda v: v is None or (_real(v) and v == 1), "1.0"),
}


def _pure_sampling(c, **_) -> None:
    """The KL estimate and the policy gradient assume responses drawn from the policy itself."""
    gen = c.get("generation") or {}
    for key, (neutral, example) in _NEUTRAL.items():
        if key in gen and not neutral(gen[key]):
            raise ConfigError(
                f"generation.{key}={_show(gen[key])}: training rollouts must sample from the policy itself "
                "(temperature=1, top_k=0, top_p=1): the KL estimate and the policy gradient assume pure samples of "
                f"the policy, and the calibration samples and evaluation sample the same way; e.g. "
                f"generation.{key}={example}")


def _transform_fits_calibrator(c, choices=None, **_) -> None:
    transform = (c.get("transform") or {}).get("_target_")
    calibrator = (c.get("calibrator") or {}).get("_target_")
    if transform is None or calibrator not in CALIBRATORS or transform not in TARGET_KEYS["transform"]:
        return  # an unknown class: run() compares the instances' flags
    if (transform not in RAW_TRANSFORMS) != CALIBRATORS[calibrator]:
        t, cal = (choices or {}).get("transform") or transform, (choices or {}).get("calibrator") or calibrator
        raise ConfigError(f"transform={t} and calibrator={cal} do not fit: raw rewards go with "
                          "calibrator=passthrough, calibrated transforms with calibrator=empirical")


_CACHED_POLICIES = ("infalign.models.policy.tiny_policy", "infalign.models.policy.smollm2_policy")


def _reward_on_cached_policy(c, **_) -> None:
    """reward.backbone=policy / policy_frozen fine-tunes the cached reference policy's network."""
    reward, model = c.get("reward") or {}, c.get("model") or {}
    backbone = reward.get("backbone") if str(reward.get("_target_", "")).endswith(".trained_reward") else None
    if backbone in ("policy", "policy_frozen") and model.get("_target_") not in _CACHED_POLICIES:
        raise ConfigError(f"reward.backbone={backbone} is built on the cached reference policy (model=tiny or "
                          f"model=smollm2), but model._target_ is {model.get('_target_')}; pick another "
                          "reward.backbone (e.g. minilm) or reward=hf")


CROSS_RULES = (_presets_named_by_file, _samples_cover_n, _prompts_fit, _distill_within_iterations,
               _processes_share, _minibatches_divide, _iterations_one_source, _manual_optimisation, _pure_sampling,
               _transform_fits_calibrator, _reward_on_cached_policy)


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
    """Check every key of `python train.py`'s config and the rules between them; raise `ConfigError` on the first
    refused value, return the warnings (values that are valid but lose something).

    `choices`: Hydra's group choices (`HydraConfig.get().runtime.choices`), named in the messages; `multirun`:
    a `-m` sweep member."""
    choices = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else choices
    c = _plain(cfg)
    _check_known_keys(c, choices)
    for path, key in KEYS.items():
        _check_key(c, path, key)
    _run_options(c)
    for rule in CROSS_RULES:
        rule(c, choices=choices, multirun=multirun)
    return [w for w in (rule(c) for rule in WARNINGS) if w]


_shown: set[str] = set()


def report_warnings(warnings: list[str]) -> None:
    """Log each warning once per process (train.py checks first, then run() checks again)."""
    for message in warnings:
        if message not in _shown:
            _shown.add(message)
            log.warning("%s", message)
