"""The rules between keys of a composed config (plain data, each key already checked on its own), each written once:
each raises `ConfigError` (one line) on the first that breaks."""

from __future__ import annotations

from collections.abc import Mapping

from infalign.config.models import CACHED_POLICIES, CALIBRATORS, RAW, TRANSFORMS
from infalign.config.rules import processes, show
from infalign.runtime.errors import ConfigError

ITERATIONS = "it would change the number or length of the iterations: set rl.iterations instead"
MANUAL = "the RL update steps the optimizer itself (manual optimisation): "
TRAINER_OWN = {  # Lightning's parameters that infalign sets, or whose work it does itself
    **dict.fromkeys(("max_steps", "min_epochs", "min_steps", "max_time", "fast_dev_run", "limit_train_batches"),
                    ITERATIONS),
    "accumulate_grad_batches": MANUAL + "one step per rl.minibatch_size sequences; raise rl.minibatch_size instead",
    **dict.fromkeys(("gradient_clip_val", "gradient_clip_algorithm"), MANUAL + "it clips the gradient norm; set "
                    "rl.grad_clip instead"),
    **{name: f"infalign sets it (to {use})" for name, use in (
        ("logger", "the logger group: logger=wandb or logger=none"), ("callbacks", "infalign's own callbacks"),
        ("enable_progress_bar", "progress=true|false"), ("default_root_dir", "hydra.run.dir"),
        ("use_distributed_sampler", "infalign's sampler, which shards each iteration's prompts"),
        ("plugins", "infalign's checksummed checkpoint I/O"), ("enable_checkpointing", "checkpoint.every"))},
}


def choices_fit(c: dict, choices: Mapping | None) -> None:
    """The values that must go together."""
    if c["resume"] is not False and c["overwrite"]:
        raise ConfigError("resume and overwrite=true contradict each other: resume continues the run in "
                          "hydra.run.dir, overwrite replaces it; pass one of them")
    transform, calibrator = (c.get("transform") or {}).get("_target_"), (c.get("calibrator") or {}).get("_target_")
    if transform in TRANSFORMS and calibrator in CALIBRATORS and (transform in RAW) != (calibrator in RAW):
        named = {"transform": transform, "calibrator": calibrator, **(choices or {})}
        raise ConfigError(f"transform={named['transform']} and calibrator={named['calibrator']} do not fit: raw "
                          "rewards go with calibrator=passthrough, calibrated transforms with calibrator=empirical")
    # solver=maxk estimates the win rate at N from the rl.k samples of a prompt, against its reference rewards
    if str((c.get("solver") or {}).get("_target_", "")).endswith(".MaxK"):
        if c["rl"]["k"] < c["n"]:
            raise ConfigError(f"rl.k={c['rl']['k']} is below n={c['n']}: solver=maxk estimates the best-of-N win rate "
                              f"from k >= N samples per prompt; e.g. rl.k={2 * c['n']}")
        if not str(calibrator).endswith("EmpiricalCalibrator"):
            raise ConfigError("solver=maxk compares each sample with the reference's samples of its prompt: it needs "
                              "calibrator=empirical (drop calibrator=passthrough / method=raw)")
    reward, model = c["reward"], c["model"]
    backbone = reward.get("backbone") if str(reward["_target_"]).endswith(".trained_reward") else None
    if backbone in ("policy", "policy_frozen") and model["_target_"] not in CACHED_POLICIES:
        raise ConfigError(f"reward.backbone={backbone} is built on the cached reference policy (model=tiny or "
                          f"model=smollm2), but model._target_ is {model['_target_']}; pick another reward.backbone "
                          "(e.g. minilm) or reward=hf")


def samples_fit(c: dict) -> None:
    """The win rate at N needs M >= N reference and K >= N policy samples per prompt; the training prompts hold an
    iteration's prompts and the held-in evaluation's; the distilling iterations are some of rl.iterations."""
    top, have = max({int(x) for x in c["eval"]["ns"]} | {int(c["n"])}), c["data"]["train_prompts"]
    for name, value, needs in (("calibration.m", c["calibration"]["m"], "the win rate at N needs M >= N reference"),
                               ("eval.k", c["eval"]["k"], "best-of-N needs K >= N policy")):
        if value < top:
            raise ConfigError(f"{name}={value} is below N={top}: {needs} samples per prompt; raise {name} or lower n "
                              "/ eval.ns")
    for name, value, fix in (("rl.prompts_per_iteration", c["rl"]["prompts_per_iteration"], "an iteration's prompts "
                              "are drawn from the training prompts; lower it or raise data.train_prompts"),
                             ("eval.held_in_prompts", c["eval"]["held_in_prompts"], "the held-in evaluation takes "
                              f"its prompts from the training prompts; e.g. eval.held_in_prompts={have}")):
        if value > have:
            raise ConfigError(f"{name}={value} exceeds data.train_prompts={have}: {fix}")
    it, total = c["distill"]["iterations"], c["rl"]["iterations"]
    if it > total:
        raise ConfigError(f"distill.iterations must be an integer from 0 to rl.iterations={total} (the first of all "
                          f"iterations that distil; 0 = off), got {it}; e.g. distill.iterations={total}")


def batches_fit(c: dict, multirun: bool) -> None:
    """Each of W processes takes an equal share of every iteration's prompts and every minibatch; every optimizer
    step takes a whole minibatch (a remainder would be a smaller, noisier last step)."""
    rl, distill, world = c["rl"], c["distill"], processes(c["trainer"])
    if multirun and world != 1:  # Lightning's launcher re-runs the command line per process: each the whole sweep
        raise ConfigError("a sweep (-m) runs in one process; it cannot start trainer.devices x trainer.num_nodes "
                          "processes per member: sweep with a shell loop over single runs instead")
    world = world or 1
    for name in ("rl.prompts_per_iteration", "rl.minibatch_size", "distill.minibatch_size"):
        value = c[name.split(".")[0]][name.split(".")[1]]
        if value % world:
            raise ConfigError(f"{name}={value} must be divisible by the {world} processes (trainer.devices x "
                              f"trainer.num_nodes): each takes an equal share; e.g. {name}="
                              f"{world * -(-value // world)}")
    for section, what, used in (("rl", "k", rl["iterations"] > distill["iterations"]),
                                ("distill", "samples_per_prompt", distill["iterations"] > 0)):
        total, mb = rl["prompts_per_iteration"] * c[section][what], c[section]["minibatch_size"]
        if used and total % mb:
            fits = max(d for d in range(world, mb + 1, world) if total % d == 0)
            raise ConfigError(f"{section}.minibatch_size must divide the rl.prompts_per_iteration x {section}.{what} "
                              f"= {total} sequences of an iteration (else the last optimizer step is a smaller one: "
                              f"{mb} splits them into {-(-total // mb)} steps), got {mb}; e.g. "
                              f"{section}.minibatch_size={fits}")


def trainer_fits(c: dict) -> None:
    """rl.iterations is the run's one count of iterations, and the update steps the optimizer itself (manual
    optimisation): Lightning's own limits, accumulation and clipping would act behind its back."""
    trainer, iterations = c["trainer"], c["rl"]["iterations"]
    if trainer.get("max_epochs") != iterations:
        shown = show(trainer["max_epochs"]) if "max_epochs" in trainer else "absent (Lightning's default: 1000)"
        raise ConfigError(f"trainer.max_epochs={shown} differs from rl.iterations={iterations}: set rl.iterations "
                          f"instead (the number of RL iterations, one Lightning epoch each; now {iterations}), and "
                          "leave trainer.max_epochs at ${rl.iterations}")
    for name, why in TRAINER_OWN.items():
        if name in trainer:
            raise ConfigError(f"trainer.{name}={show(trainer[name])}: {why}; remove trainer.{name}")
