"""The rules between keys (`CROSS_RULES`): each takes the plain config (and Hydra's group `choices`, `multirun`)
and raises `ConfigError` when the keys, each valid on its own, do not fit together."""

from __future__ import annotations

from collections.abc import Mapping

from infalign.runtime.schema.fields import _ABSENT, processes
from infalign.runtime.schema.keys import CALIBRATORS, RAW_TRANSFORMS, SET_BY_RUN, TARGET_KEYS
from infalign.runtime.schema.rules import ConfigError, _int, _real, _show


# ---------------------------------------------------------------------------------------------- cross-field rules
def _presets_named_by_file(c, choices, **_) -> None:
    """A method preset's `method` value is its file name: the study tables group by it. (A solver preset's name is
    Hydra's choice, recorded as such; its `solver` node is the solver.)"""
    for group, why in (("method", "a method preset's `method` is its file name (the study grids are indexed by it)"),):
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


def _distill_iterations_need_a_distilling_solver(c, **_) -> None:
    """`distill.iterations` is a stage's length (solver=distill_rl), no switch: a solver that never distils refuses it."""
    solver = c.get("solver")
    target = str(solver.get("_target_", "")) if isinstance(solver, Mapping) else ""
    it = c["distill"]["iterations"]
    if it and target.startswith("infalign.trainer.solvers.") and target.rsplit(".", 1)[1] in (
            "policy_gradient", "RLOO", "ExactKL"):
        raise ConfigError(f"distill.iterations={it} does nothing with solver {target}, which never distils: distillation "
                          f"is a solver (solver=distill_rl distill.iterations={it}: distil first, then exact RL; "
                          "solver=distill: distil only); docs/solvers.md")


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
               _distill_iterations_need_a_distilling_solver,
               _processes_share, _minibatches_divide, _iterations_one_source, _manual_optimisation, _pure_sampling,
               _transform_fits_calibrator, _reward_on_cached_policy)
