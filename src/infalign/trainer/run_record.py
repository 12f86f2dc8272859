"""What a checkpoint records of its run, and what a resume changes of it (`infalign.trainer.resume` refuses or allows).

`run_record` is the run's resolved config and its group choices, saved into every checkpoint; `checkpoint_state`
reads it back with the iterations done, without the tensors. `config_changes` compares two records over the keys
that define the experiment (`EXPERIMENT_KEYS`, the Hydra choices of `CONFIG_GROUPS`, less `NOT_COMPARED`): a
raised `rl.iterations` is an extension, anything else a change, and a change of `SHAPE_KEYS` one the checkpoint's
weights cannot follow.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from infalign.runtime.checkpoint_io import load_checkpoint
from infalign.runtime.presets import flatten

__all__ = ["ABSENT", "CONFIG_GROUPS", "EXPERIMENT_KEYS", "EXTENSIBLE", "NOT_COMPARED", "SHAPE_KEYS", "checkpoint_state",
           "config_changes", "run_record"]


# What defines an experiment: a resume that changes any of these is refused unless resume_allow_changes=true.
# (eval.*, checkpoint.*, trainer, logger, progress, num_threads, cache_root may change freely; model.lora.* counts
# only with LoRA on, r > 0, and its save_merged, like model.gradient_checkpointing, may change: NOT_COMPARED.)
EXPERIMENT_KEYS = ("model", "reward", "data", "calibrator", "transform", "generation", "n", "beta", "seed", "rl",
                   "optimizer", "scheduler", "distill", "calibration")
CONFIG_GROUPS = ("model", "reward", "data", "calibrator", "transform", "solver")  # their Hydra choices compared too
NOT_COMPARED = ("data.root",  # where the data lies, not what it is: a run moved to another machine finds it elsewhere
                # how the policy is saved and how much memory its update takes, not what it learns
                "model.lora.save_merged", "model.gradient_checkpointing")
# What the checkpoint's weights fix: the policy's architecture, vocabulary and LoRA adapter shapes. Loading them
# into another shape fails with a raw size mismatch after the models were built, so a change of these is refused
# up front even with resume_allow_changes=true (a prefix of the dotted keys).
SHAPE_KEYS = ("choices.model", "model.name_or_path", "model.gpt2.", "model.tokenizer.", "model.lora.r",
              "model.lora.target_modules")
EXTENSIBLE = "rl.iterations"  # raising it continues a run, finished or not: always allowed
ABSENT = "<absent>"


# ---------------------------------------------------------------------------------------- resume checks
def run_record(cfg, choices) -> dict:
    """What a checkpoint records of its run: the resolved config (plain data) and the experiment's group choices."""
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return {"config": config, "choices": {g: (choices or {}).get(g) for g in CONFIG_GROUPS}}


def checkpoint_state(path: str | Path) -> dict | None:
    """A checkpoint's iterations done, global step, recorded run config and metric row counts, read without its
    tensors (mapped, not loaded); None for a sharded (directory) checkpoint, whose strategy reads it."""
    path = Path(path)
    if path.is_dir():
        return None
    ckpt = load_checkpoint(path, mmap=True, checksum=False)  # verified by resolve_resume just before
    progress = (((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current") or {}
    # `processed` counts the iterations whose training ended (raised before on_train_epoch_end, where we save)
    iteration = progress.get("processed", int(ckpt.get("epoch", -1)) + 1)
    return {"iteration": int(iteration), "global_step": int(ckpt.get("global_step", 0)),
            "run_config": ckpt.get("run_config"), "metric_rows": ckpt.get("metric_rows")}


def _experiment(record: dict) -> dict:
    config = record.get("config") or {}
    flat = {f"choices.{g}": v for g, v in (record.get("choices") or {}).items() if g in CONFIG_GROUPS}
    if "choices.solver" not in flat and isinstance(config.get("solver"), str):  # a record from before the solver node
        flat["choices.solver"] = config["solver"]
    for key in EXPERIMENT_KEYS:
        if key in config:
            flat.update(flatten(config[key], f"{key}."))
    if not flat.get("model.lora.r"):  # LoRA off (r=0, or a record from before model.lora): its other keys do nothing
        flat = {k: v for k, v in flat.items() if not k.startswith("model.lora.")}
    return {k: v for k, v in flat.items() if k not in NOT_COMPARED}


def _same(x, y) -> bool:
    return x == y and isinstance(x, bool) == isinstance(y, bool)  # 1 == 1.0, but true is not 1


def config_changes(old: dict, new: dict) -> tuple[dict, dict]:
    """`(changes, extensions)` from run record `old` to `new`, each `{dotted key: (old value, new value)}` over
    the experiment keys; a raised `rl.iterations` is an extension, not a change."""
    a, b = _experiment(old), _experiment(new)
    changes = {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
               if not _same(a.get(k, ABSENT), b.get(k, ABSENT))}
    extensions = {}
    if EXTENSIBLE in changes:
        before, after = changes[EXTENSIBLE]
        if isinstance(before, int) and isinstance(after, int) and after > before:
            extensions[EXTENSIBLE] = changes.pop(EXTENSIBLE)
    return changes, extensions


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _inline(diff: dict) -> str:  # one line: user errors are printed as one
    return "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())


def _lines(diff: dict) -> str:
    return "\n".join(f"  {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
