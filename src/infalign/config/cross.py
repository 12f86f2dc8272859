"""The rules between keys of a composed config, each written once: `check_between` applies them in turn to the
plain config (:func:`infalign.config.check.plain`), after every key has passed its own check. Each raises a
one-line ConfigError naming the keys that conflict and a value that fits."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING
from functools import partial

from infalign.config.models import CACHED_POLICIES
from infalign.config.rules import is_int, processes, show
from infalign.config.schema import CALIBRATORS, RAW, TRANSFORMS
from infalign.runtime.errors import ConfigError

SET_BY_RUN = {"logger": "the logger group (logger=wandb or logger=none)", "callbacks": "infalign's own callbacks",
              "enable_progress_bar": "progress=true|false", "default_root_dir": "hydra.run.dir",
              "use_distributed_sampler": "infalign's sampler, which shards each iteration's prompts",
              "plugins": "infalign's checksummed checkpoint I/O", "enable_checkpointing": "checkpoint.every"}


def check_between(c: Mapping, choices: Mapping | None, multirun: bool) -> None:
    for rule in (_resume_or_overwrite, _samples_cover_n, _maxk_fits, _prompts_fit, _distill_within_iterations,
                 partial(_processes_share, multirun=multirun), _minibatches_divide, _trainer_fits,
                 partial(_transform_fits_calibrator, choices=choices), _reward_on_cached_policy):
        rule(c)


def _resume_or_overwrite(c) -> None:
    if c.get("resume", False) is not False and c.get("overwrite"):
        raise ConfigError("resume and overwrite=true contradict each other: resume continues the run in "
                          "hydra.run.dir, overwrite replaces it; pass one of them")


def _maxk_fits(c) -> None:
    """solver=maxk estimates the win rate at N from the rl.k samples of a prompt, against its reference rewards."""
    solver = c.get("solver") or {}
    if not (isinstance(solver, Mapping) and str(solver.get("_target_", "")).endswith(".MaxK")):
        return
    if c["rl"]["k"] < c["n"]:
        raise ConfigError(f"rl.k={c['rl']['k']} is below n={c['n']}: solver=maxk estimates the best-of-N win rate from "
                          f"k >= N samples per prompt; e.g. rl.k={2 * c['n']}")
    if not str((c.get("calibrator") or {}).get("_target_", "")).endswith("EmpiricalCalibrator"):
        raise ConfigError("solver=maxk compares each sample with the reference's samples of its prompt: it needs "
                          "calibrator=empirical (drop calibrator=passthrough / method=raw)")


def _samples_cover_n(c) -> None:
    """The win rate at N needs M >= N reference samples and K >= N policy samples per prompt."""
    top = max({int(x) for x in c["eval"]["ns"]} | {int(c["n"])})
    for name, have, needs in (("calibration.m", c["calibration"]["m"], "the win rate at N needs M >= N reference"),
                              ("eval.k", c["eval"]["k"], "best-of-N needs K >= N policy")):
        if have < top:
            raise ConfigError(f"{name}={have} is below N={top}: {needs} samples per prompt; raise {name} or lower n "
                              "/ eval.ns")


def _prompts_fit(c) -> None:
    """An iteration's prompts and the held-in evaluation's are drawn from the training prompts."""
    have = c["data"]["train_prompts"]
    for name, value, fix in (("rl.prompts_per_iteration", c["rl"]["prompts_per_iteration"], "an iteration's prompts "
                              "are drawn from the training prompts; lower it or raise data.train_prompts"),
                             ("eval.held_in_prompts", c["eval"].get("held_in_prompts", 0), "the held-in evaluation "
                              f"takes its prompts from the training prompts; e.g. eval.held_in_prompts={have}")):
        if value > have:
            raise ConfigError(f"{name}={value} exceeds data.train_prompts={have}: {fix}")


def _distill_within_iterations(c) -> None:
    it, total = c["distill"]["iterations"], c["rl"]["iterations"]
    if it > total:
        raise ConfigError(f"distill.iterations must be an integer from 0 to rl.iterations={total} (the first of all "
                          f"iterations that distil; 0 = off), got {it}; e.g. distill.iterations={total}")


def _processes_share(c, multirun: bool) -> None:
    """Each of W processes takes an equal share of every iteration's prompts and every minibatch."""
    world = processes(c.get("trainer"))
    if multirun and world != 1:  # Lightning's launcher re-runs the command line per process: each the whole sweep
        raise ConfigError("a sweep (-m) runs in one process; it cannot start trainer.devices x trainer.num_nodes "
                          "processes per member: sweep with a shell loop over single runs instead")
    for name in ("rl.prompts_per_iteration", "rl.minibatch_size", "distill.minibatch_size"):
        section, leaf = name.split(".")
        if world and world > 1 and c[section][leaf] % world:
            raise ConfigError(f"{name}={c[section][leaf]} must be divisible by the {world} processes (trainer.devices "
                              f"x trainer.num_nodes): each takes an equal share; e.g. {name}="
                              f"{world * -(-c[section][leaf] // world)}")


def _minibatches_divide(c) -> None:
    """Every optimizer step takes a whole minibatch: a remainder would be a smaller, noisier last step."""
    rl, distill, world = c["rl"], c["distill"], processes(c.get("trainer")) or 1
    sizes = []
    if rl["iterations"] > distill["iterations"]:
        sizes.append((rl["prompts_per_iteration"] * rl["k"], "rl.prompts_per_iteration x rl.k", "rl.minibatch_size"))
    if distill["iterations"] > 0:
        sizes.append((rl["prompts_per_iteration"] * distill["samples_per_prompt"],
                      "rl.prompts_per_iteration x distill.samples_per_prompt", "distill.minibatch_size"))
    for total, what, name in sizes:
        mb = c[name.split(".")[0]]["minibatch_size"]
        if total % mb:
            fits = [d for d in range(world, total + 1, world) if total % d == 0]
            example = max((d for d in fits if d <= mb), default=fits[0] if fits else total)
            raise ConfigError(f"{name} must divide the {what} = {total} sequences of an iteration (else the last "
                              f"optimizer step is a smaller one: {mb} splits them into {-(-total // mb)} steps), got "
                              f"{mb}; e.g. {name}={example}")


def _trainer_fits(c) -> None:
    """rl.iterations is the run's one count of iterations, and the update steps the optimizer itself (manual
    optimisation): Lightning's own limits, accumulation and clipping would act behind its back."""
    trainer, iterations = c.get("trainer") or {}, c["rl"]["iterations"]
    fix = f"set rl.iterations instead (the number of RL iterations, one Lightning epoch each; now {iterations})"
    epochs = trainer.get("max_epochs", MISSING)
    if epochs != iterations:
        shown = "absent (Lightning's default: 1000)" if epochs is MISSING else show(epochs)
        raise ConfigError(f"trainer.max_epochs={shown} differs from rl.iterations={iterations}: {fix}, and leave "
                          "trainer.max_epochs at ${rl.iterations}")
    for name, neutral in (("max_steps", (-1, None)), ("min_epochs", (None,)), ("min_steps", (None,)),
                          ("max_time", (None,)), ("fast_dev_run", (False, None, 0)),
                          ("limit_train_batches", (None, 1, 1.0))):
        value = trainer.get(name)
        if not any(value == x and type(value) is type(x) for x in neutral):
            raise ConfigError(f"trainer.{name}={show(value)} would change the number or length of the iterations: "
                              f"{fix}; remove trainer.{name}")
    acc = trainer.get("accumulate_grad_batches")
    if acc not in (None, 1) or isinstance(acc, bool):
        raise ConfigError(f"trainer.accumulate_grad_batches={show(acc)}: the RL update takes one optimizer step per "
                          "rl.minibatch_size sequences itself (manual optimisation), so Lightning cannot accumulate; "
                          f"for larger steps raise rl.minibatch_size (e.g. rl.minibatch_size="
                          f"{c['rl']['minibatch_size'] * (acc if is_int(acc) and acc > 1 else 2)}) and remove "
                          "trainer.accumulate_grad_batches")
    for name in ("gradient_clip_val", "gradient_clip_algorithm"):
        if trainer.get(name) is not None:
            raise ConfigError(f"trainer.{name}={show(trainer[name])}: the RL update clips the gradient norm itself "
                              f"(manual optimisation); set rl.grad_clip instead (e.g. rl.grad_clip=1.0) and remove "
                              f"trainer.{name}")
    for name, use in SET_BY_RUN.items():
        if name in trainer:
            raise ConfigError(f"trainer.{name}={show(trainer[name])}: infalign sets it (to {use}); remove trainer.{name}")


def _transform_fits_calibrator(c, choices: Mapping | None) -> None:
    transform, calibrator = (c.get("transform") or {}).get("_target_"), (c.get("calibrator") or {}).get("_target_")
    if transform in TRANSFORMS and calibrator in CALIBRATORS and (transform in RAW) != (calibrator in RAW):
        t, cal = (choices or {}).get("transform"), (choices or {}).get("calibrator")
        raise ConfigError(f"transform={t} and calibrator={cal} do not fit: raw rewards go with calibrator=passthrough, "
                          "calibrated transforms with calibrator=empirical")


def _reward_on_cached_policy(c) -> None:
    """reward.backbone=policy / policy_frozen fine-tunes the cached reference policy's network."""
    reward, model = c["reward"], c["model"]
    backbone = reward.get("backbone") if str(reward["_target_"]).endswith(".trained_reward") else None
    if backbone in ("policy", "policy_frozen") and model["_target_"] not in CACHED_POLICIES:
        raise ConfigError(f"reward.backbone={backbone} is built on the cached reference policy (model=tiny or "
                          f"model=smollm2), but model._target_ is {model['_target_']}; pick another reward.backbone "
                          "(e.g. minilm) or reward=hf")
