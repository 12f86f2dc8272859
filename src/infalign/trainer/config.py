"""`validate_config`: every check of `python train.py`'s config that needs no model, in one place.

`infalign.trainer.run.run` calls it first, so a bad value is refused in seconds, naming the key, before
any data is read or model built. The rules it applies live with what they describe (N and beta:
`infalign.core.checks`; a model or reward config's keys: `infalign.models.loaders`; sampling:
`infalign.models.sampling`; resume options: `infalign.trainer.checkpointing`).
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from infalign.core.checks import check_beta, check_n
from infalign.core.losses import KL_PENALTY_MODES
from infalign.models.data import PARTITIONS
from infalign.models.loaders import check_loader_config
from infalign.models.lora import check_gradient_checkpointing, check_lora_settings
from infalign.models.pure_sampling import sampling_kwargs
from infalign.trainer.checkpointing import check_run_options

__all__ = ["RL_ALGOS", "processes", "validate_config"]

RL_ALGOS = ("rloo", "ppo")
_CACHED_POLICIES = ("infalign.models.policy.tiny_policy", "infalign.models.policy.smollm2_policy")


def _positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def processes(trainer_cfg) -> int | None:
    """Processes a trainer config starts (None when it is left to Lightning, e.g. devices=auto)."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int):
        return devices * nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * nodes
    return len(devices) * nodes if OmegaConf.is_list(devices) else None


def _source(group: str, choices: Mapping | None) -> str | None:
    """Where a group's config came from, for the messages: its file, and the scale preset that sets its sizes."""
    choice, scale = (choices or {}).get(group), (choices or {}).get("scale")
    if not choice:
        return None
    return f"conf/{group}/{choice}.yaml" + (f" (as composed with conf/scale/{scale}.yaml)" if scale else "")


def _check_models(cfg: DictConfig, choices: Mapping | None) -> None:
    """The model and reward configs: known keys only (an unknown one is a typo that would be dropped), values
    in range, required ones set; and a reward trained on the reference policy needs a cached one."""
    check_loader_config(cfg.model, "model", _source("model", choices))
    check_lora_settings(cfg.model.get("lora"))  # values in range; peft installed when LoRA is on
    check_gradient_checkpointing(cfg.model.get("gradient_checkpointing", False))
    reward = check_loader_config(cfg.reward, "reward", _source("reward", choices))
    backbone = cfg.reward.get("backbone") if reward.__name__ == "trained_reward" else None
    if backbone in ("policy", "policy_frozen") and cfg.model._target_ not in _CACHED_POLICIES:
        raise ValueError(f"reward.backbone={backbone} is built on the cached reference policy (model=tiny or "
                         f"model=smollm2), but model._target_ is {cfg.model._target_}; pick another reward.backbone "
                         "(e.g. minilm) or reward=hf")


def validate_config(cfg: DictConfig, choices: Mapping | None = None, *, multirun: bool = False) -> None:
    """Every check that needs no model: clear errors naming the key, raised before heavy compute.

    `choices`: Hydra's group choices (`hydra.runtime.choices`), named in the messages; `multirun`: a `-m` sweep.
    """
    n = check_n(cfg.n)
    check_beta(cfg.beta)
    method = (choices or {}).get("method")
    if method and cfg.get("method") != method:
        raise ValueError(f"conf/method/{method}.yaml sets method: {cfg.get('method')!r}; a method preset's `method` "
                         f"is its file name (the study grids are indexed by it): set method: {method}")
    solver = (choices or {}).get("solver")
    if solver and cfg.get("solver") != solver:
        raise ValueError(f"conf/solver/{solver}.yaml sets solver: {cfg.get('solver')!r}; a solver preset's `solver` "
                         f"is its file name (final_metrics.json and the study tables record it): set solver: {solver}")
    rl, cal, ev = cfg.rl, cfg.calibration, cfg.eval
    if rl.algo not in RL_ALGOS:
        raise ValueError(f"rl.algo must be 'rloo' or 'ppo', got {rl.algo!r}")
    _positive_int(rl.k, "rl.k", 2)  # both use the leave-one-out baseline
    for key in ("iterations", "prompts_per_iteration", "minibatch_size", "ppo_epochs"):
        _positive_int(rl[key], f"rl.{key}")
    m = _positive_int(cal.m, "calibration.m")
    eval_k = _positive_int(ev.k, "eval.k")
    ns = sorted({check_n(x) for x in ev.ns} | {n})
    if m < ns[-1]:
        raise ValueError(f"calibration.m={m} is below N={ns[-1]}: the win rate at N needs M >= N reference samples "
                         "per prompt; raise calibration.m or lower n / eval.ns")
    if eval_k < ns[-1]:
        raise ValueError(f"eval.k={eval_k} is below N={ns[-1]}: raise eval.k or lower n / eval.ns")
    log_samples = ev.get("log_samples", 0)
    if isinstance(log_samples, bool) or not isinstance(log_samples, int) or log_samples < 0:
        raise ValueError(f"eval.log_samples must be an integer >= 0 (eval prompts whose responses are logged; 0 = "
                         f"off), got {log_samples!r}")
    if rl.prompts_per_iteration > cal.train_prompts:
        raise ValueError(f"rl.prompts_per_iteration={rl.prompts_per_iteration} exceeds calibration.train_prompts="
                         f"{cal.train_prompts}")
    if cal.eval_partition not in PARTITIONS or cal.eval_partition == "train":
        raise ValueError(f"calibration.eval_partition must be a held-out partition (validation or test), got "
                         f"{cal.eval_partition!r}")
    sampling_kwargs(cfg.generation, for_training=True)
    if rl.kl_penalty == "loss":
        raise ValueError("rl.kl_penalty=loss (k3 per token in the loss) is gone: its fixed point is not the tilted "
                         "reference pi_ref exp(Phi/beta). Use rl.kl_penalty=exact (the full-vocabulary KL per token in the "
                         "loss, with the KL still to come in the advantage) or reward (k1 per sequence in the reward)")
    if rl.kl_penalty not in KL_PENALTY_MODES:
        raise ValueError(f"rl.kl_penalty must be one of {KL_PENALTY_MODES}, got {rl.kl_penalty!r}")
    distill = cfg.get("distill")
    if distill is not None:
        iterations = distill.iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not 0 <= iterations <= rl.iterations:
            raise ValueError(f"distill.iterations must be an integer from 0 to rl.iterations={rl.iterations} (the "
                             f"first of all iterations that distil; 0 = off), got {iterations!r}")
        _positive_int(distill.m, "distill.m", 2)  # leave-one-out calibration needs another sample
        _positive_int(distill.samples_per_prompt, "distill.samples_per_prompt")
        _positive_int(distill.prompts_per_batch, "distill.prompts_per_batch")
    if rl.target_kl is not None and not rl.target_kl > 0:
        raise ValueError(f"rl.target_kl must be a positive number or null, got {rl.target_kl!r}")
    check_run_options(cfg)  # resume, overwrite, checkpoint.every
    if multirun and processes(cfg.trainer) != 1:
        # Lightning's launcher re-runs the whole command line per process: each would run the whole sweep
        raise ValueError("a sweep (-m) runs in one process; it cannot start trainer.devices x trainer.num_nodes "
                         "processes per member: sweep with a shell loop over single runs instead")
    _check_models(cfg, choices)
