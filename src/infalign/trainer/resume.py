"""How a run continues after a crash, a kill or a stop signal (the saving itself: `infalign.trainer.checkpointing`),
decided before any model is loaded: which checkpoint (`resolve_resume`, never clobbering another run's outputs),
whether this command may continue it (`check_resume`: a changed experiment is refused, listing the keys, unless
`resume_allow_changes=true`; raising `rl.iterations` is always allowed; a finished run is left as it is), and
the command line that continues it (`resume_command`).
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loops.fit_loop import _FitLoop
from omegaconf import OmegaConf

from infalign.runtime.atomic import read_csv_rows, remove_stale_temps
from infalign.runtime.checkpoint_io import load_checkpoint, verify_checkpoint
from infalign.runtime.errors import ConfigError
from infalign.runtime.presets import flatten
from infalign.runtime.run_dir import is_first_process

log = logging.getLogger(__name__)

__all__ = ["ResumePlan", "check_resume", "checkpoint_state", "config_changes", "finish_restored_loops",
           "resolve_resume", "resume_command", "run_record", "EXPERIMENT_KEYS", "LAST", "RESUME_HISTORY",
           "RUN_CONFIG", "SHAPE_KEYS"]

LAST = "last.ckpt"  # checkpoints/last.ckpt: what a run resumes from (kept current by checkpointing.LastCheckpoint)
RUN_CONFIG = "run_config.yaml"  # the resolved config the run started with: written once, never overwritten
RESUME_HISTORY = "resume_history.jsonl"  # one JSON line per resume: from where, with which overrides, what changed
RUN_OUTPUTS = ("checkpoints", "final_metrics.json", "eval_metrics.csv", "eval_samples.jsonl", "logs", "policy",
               RUN_CONFIG, RESUME_HISTORY)

# What defines an experiment: a resume that changes any of these is refused unless resume_allow_changes=true.
# (eval.*, checkpoint.*, trainer, logger, progress, num_threads, cache_root may change freely; model.lora.* counts
# only with LoRA on, r > 0, and its save_merged, like model.gradient_checkpointing, may change: NOT_COMPARED.)
EXPERIMENT_KEYS = ("model", "reward", "data", "calibrator", "transform", "generation", "n", "beta", "seed", "rl",
                   "optimizer", "scheduler", "distill", "calibration")
CONFIG_GROUPS = ("model", "reward", "data", "calibrator", "transform", "solver")  # their Hydra choices compared too
NOT_COMPARED = ("data.root",  # where the data lies, not what it is: a run moved to another machine finds it elsewhere
                # how the policy is saved and how much memory its update takes, not what it learns
                "model.lora.save_merged", "model.gradient_checkpointing",
                # removed keys an older checkpoint records; every sampler drew exactly from the policy
                "generation.sampler", "generation.cache_implementation")
# What the checkpoint's weights fix: the policy's architecture, vocabulary and LoRA adapter shapes. Loading them
# into another shape fails with a raw size mismatch after the models were built, so a change of these is refused
# up front even with resume_allow_changes=true (a prefix of the dotted keys).
SHAPE_KEYS = ("choices.model", "model.name_or_path", "model.gpt2.", "model.tokenizer.", "model.lora.r",
              "model.lora.target_modules")
EXTENSIBLE = "rl.iterations"  # raising it continues a run, finished or not: always allowed
ABSENT = "<absent>"


class MissingCheckpoint(ConfigError, FileNotFoundError):
    """resume=true, and the run directory holds no checkpoint."""


class RunDirTaken(ConfigError, FileExistsError):
    """A fresh start in a directory that holds another run's outputs."""


class ResumeRefused(ConfigError):
    """A resume whose command changes the run's experiment."""


# ---------------------------------------------------------------------------------------- what a checkpoint records
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


def _show(diff: dict, sep: str = "; ", indent: str = "") -> str:
    """`key: old -> new` for each of `diff`, joined by `sep` (by default one line: user errors are printed as one)."""

    def text(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    return sep.join(f"{indent}{k}: {text(a)} -> {text(b)}" for k, (a, b) in diff.items())


# ---------------------------------------------------------------------------------------- which checkpoint, if any
def _existing_outputs(run_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (p := run_dir / name).is_file() or (p.is_dir() and any(p.iterdir()))]


def _clear_outputs(run_dir: Path, names: list[str]) -> None:
    for name in names:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def resolve_resume(run_dir: Path, resume, overwrite: bool) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; never clobbers another run silently.

    resume=true needs `checkpoints/last.ckpt`; resume=auto continues from it when there is one and starts
    afresh otherwise (what a pre-emptible job's restart loop wants); a checkpoint that fails verification is
    refused in both cases rather than silently ignored. A fresh start in a directory that holds a run's
    outputs is refused unless overwrite=true, which deletes them first. Only the first process of a
    distributed run judges and clears the directory: the others start when it has already begun writing there.
    """
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / LAST
    if not is_first_process():
        return last if resume is not False and last.exists() else None
    for folder in (run_dir, run_dir / "logs", last.parent):  # what a kill during an atomic write leaves behind:
        remove_stale_temps(folder)  # an evaluation's files, the metrics log, a checkpoint
    if resume is True and not last.exists():
        raise MissingCheckpoint(f"resume=true but {last} does not exist: point hydra.run.dir at the run to "
                                "continue, or pass resume=auto to start afresh when there is no checkpoint")
    if resume is not False and last.exists():
        verify_checkpoint(last)  # before any model is built: a bad checkpoint fails in seconds
        log.info("resuming from %s", last)
        return last
    existing = _existing_outputs(run_dir)
    if resume == "auto" and existing and not {"final_metrics.json", "policy"} & set(existing):
        log.warning("resume=auto: %s holds no checkpoint yet; starting afresh (clearing %s)", run_dir, existing)
        _clear_outputs(run_dir, existing)
    elif existing:
        if not overwrite:
            raise RunDirTaken(f"{run_dir} already holds a run's outputs ({', '.join(existing)}): pass resume=true "
                              "(or resume=auto) to continue it, overwrite=true to replace it, or choose another "
                              "hydra.run.dir")
        log.warning("overwrite=true: deleting %s in %s", existing, run_dir)
        _clear_outputs(run_dir, existing)
    return None


def resume_command(task_overrides: list[str], run_dir: Path, resume: str = "true") -> str:
    """The command line that continues this run: its own overrides, its directory, resume=true (`resume="auto"`
    for a run that may have no checkpoint yet: stopped before training)."""
    # the checkpoint records the config it was trained with, so continuing needs no resume_allow_changes
    drop = ("resume=", "overwrite=", "hydra.run.dir=", "+resume=", "resume_allow_changes=", "+resume_allow_changes=")
    kept = [o for o in task_overrides if not o.startswith(drop)]
    args = [*kept, f"hydra.run.dir={run_dir}", f"resume={resume}"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------------------------------- may this command continue it
@dataclass
class ResumePlan:
    entry: dict | None = None  # the resume_history.jsonl line, written with the resumed run's first checkpoint
    finished: dict | None = None  # the final metrics of a run that is already finished: nothing to do


def finished_results(run_dir: Path, state: dict, iterations: int, n: int) -> dict | None:
    """The final metrics when the run is finished at `iterations`: its checkpoint is at the final iteration and
    every result (final_metrics.json with the final evaluation, its eval_metrics.csv row, policy/) is there."""
    if state is None or state["iteration"] != iterations:
        return None
    try:
        final = json.loads((run_dir / "final_metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(final, dict) or final.get("iteration") != iterations or final.get("step") != state["global_step"] \
            or f"eval/bon_win_rate@{n}" not in final:
        return None
    rows = read_csv_rows(run_dir / "eval_metrics.csv")[1]
    policy = run_dir / "policy"
    if not rows or rows[-1].get("iteration") != str(iterations) or not (policy.is_dir() and any(policy.iterdir())):
        return None
    return final


def check_resume(run_dir: Path, checkpoint: Path, record: dict, *, allow_changes: bool, iterations: int, n: int,
                 overrides: list[str] = ()) -> ResumePlan:
    """Before any model is loaded: compare the checkpoint's config with the command's (refusing a changed
    experiment unless `allow_changes`), and find out whether the run is already finished."""
    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    state = checkpoint_state(checkpoint)
    if state is None:
        log.warning("%s is a sharded checkpoint: its config cannot be checked before loading; resuming with this "
                    "command's config", checkpoint)
        return ResumePlan()
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_iteration": state["iteration"],
             "from_step": state["global_step"], "overrides": list(overrides), "config_checked": True,
             "changes": {}, "extensions": {}, "resume_allow_changes": bool(allow_changes)}
    stored = state["run_config"]
    if not isinstance(stored, dict):
        log.warning("%s records no config (written by an older infalign): the command's config cannot be checked "
                    "against the run's; resuming with the command's", checkpoint)
        entry["config_checked"] = False
    else:
        changes, extensions = config_changes(stored, record)
        fixed = {k: v for k, v in changes.items() if k.startswith(SHAPE_KEYS)}
        if fixed and allow_changes:
            raise ResumeRefused(
                f"resume refused: the weights in {checkpoint} cannot take the command's policy (old -> new): "
                f"{_show(fixed)}. These keys are not changeable, even with resume_allow_changes=true: resume with the "
                f"run's own values (its config: {run_dir / RUN_CONFIG}), or start a new run in another hydra.run.dir")
        if changes and not allow_changes:
            raise ResumeRefused(
                f"resume refused: the command changes the experiment that {checkpoint} (iteration "
                f"{state['iteration']}) was trained with (old -> new): {_show(changes)}. "
                f"Resume with the run's own settings (its config: {run_dir / RUN_CONFIG}; raising rl.iterations is "
                "allowed), start a new run in another hydra.run.dir, or pass resume_allow_changes=true to continue "
                f"this run with the new values (both configs are kept: {RUN_CONFIG} and {RESUME_HISTORY})")
        if changes:
            log.warning("resume_allow_changes=true: continuing %s from iteration %d with a changed experiment "
                        "(recorded in %s):\n%s", run_dir, state["iteration"], RESUME_HISTORY,
                        _show(changes, "\n", "  "))
        if extensions:
            log.info("resume: extending the run:\n%s", _show(extensions, "\n", "  "))
        entry["changes"] = {k: list(v) for k, v in changes.items()}
        entry["extensions"] = {k: list(v) for k, v in extensions.items()}
    finished = finished_results(run_dir, state, iterations, n)
    if finished is not None:
        print(f"infalign: {run_dir} is already finished (iteration {finished['iteration']} of "
              f"rl.iterations={iterations}; final_metrics.json, eval_metrics.csv and policy/ complete): "
              "nothing to resume, no file changed. Raise rl.iterations to train it further.", flush=True)
        log.info("resume: %s is already finished; nothing done", run_dir)
    return ResumePlan(entry=entry, finished=finished)


# ---------------------------------------------------------------------------------------- a restored loop that ends
class _FitLoopThatEnds(_FitLoop):
    """Lightning's fit loop, except that a loop restored at its end still calls on_train_start and on_train_end.

    Lightning 2.6 skips a restored loop that is already done, both hooks included, so a run resumed from the
    checkpoint of its final iteration, written before the final evaluation, ended without its results. Kept
    because the stock loop loses the final evaluation (re-measured 2026-12-07, Lightning 2.6.6):
    tests/test_faults.py::test_sigkill_during_or_after_the_final_evaluation_then_resume_finishes_it[eval:3] fails
    ("training ... ended without its final evaluation")."""

    @property
    def skip(self) -> bool:
        return self.trainer.limit_train_batches == 0


def finish_restored_loops(trainer) -> None:
    if type(trainer.fit_loop) is _FitLoop:  # the same object and state, one property changed (_FitLoopThatEnds)
        trainer.fit_loop.__class__ = _FitLoopThatEnds
