"""The pieces `infalign.trainer.run.run` assembles, each built by one small function: the models, the sample sets
(the calibration cache and the distillation pool, one `CachedSamples` each), the solver; and the policy's atomic
save at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from infalign.models.checks import check_reward_context
from infalign.models.data import partition_fingerprint
from infalign.models.lora import check_lora_settings, check_target_modules
from infalign.models.policy import load_policy
from infalign.models.reward import load_reward_model
from infalign.runtime.atomic import give_plain_modes, write_errors
from infalign.runtime.manifest import fingerprint
from infalign.trainer.calibration_cache import CachedSamples
from infalign.trainer.prompts import Prompt
from infalign.trainer.solvers.base import Solver

__all__ = ["POLICY_ONLY_KEYS", "calibration_key", "check_context", "load_models", "sample_sets", "save_policy",
           "build_solver"]

POLICY_ONLY_KEYS = ("lora", "gradient_checkpointing")  # model.* keys that change the trained policy, not the reference


def check_context(model, cfg) -> None:
    """A prompt (`data.max_prompt_tokens`) and its sample (`generation.max_new_tokens`) fit the policy's context:
    ConfigError (one line) as it loads, before it computes."""
    from infalign.models.checks import check_context, context_of, fitting_budgets

    context, model_cfg = context_of(model.config), cfg.get("model") or {}
    prompt, new = int(cfg.data.max_prompt_tokens), int(cfg.generation.max_new_tokens)
    what = "data.max_prompt_tokens + generation.max_new_tokens"
    if str(model_cfg.get("_target_", "")).endswith(".tiny_policy"):  # its context is made from data.max_*_tokens
        response = int(cfg.data.max_response_tokens)
        check_context(prompt + new, what, context, "model=tiny",
                      f"model=tiny is built with data.max_prompt_tokens + data.max_response_tokens + 1 positions: set "
                      f"generation.max_new_tokens={response + 1} (at most), or data.max_response_tokens={new - 1} "
                      "(which rebuilds the model)")
        return
    name = model_cfg.get("name_or_path") or model_cfg.get("gguf_file")
    a, b = fitting_budgets(context[0], prompt, new) if context else (prompt, new)
    check_context(prompt + new, what, context, f"model.name_or_path={name}" if model_cfg.get("name_or_path")
                  else f"model={model_cfg.get('name', '?')}" + (f" ({name})" if name else ""),
                  f"lower them to fit, e.g. data.max_prompt_tokens={a} generation.max_new_tokens={b}")


def load_models(cfg: DictConfig, partitions):
    """(reference, tokenizer, reward model, LoRA settings or None): loaded from the cache, built there first if
    missing; the context and LoRA's module names checked before the reward model costs anything. The reward model's
    loader gets the policy's cache entry (a backbone built on the policy reads its folder, not its weights again)."""
    reference, tokenizer, entry = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions,
                                              progress=cfg.progress, return_entry=True)
    check_context(reference, cfg)
    lora = check_lora_settings(cfg.model.get("lora"))
    if lora:
        check_target_modules(reference, lora)
    reward_model = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions,
                                     progress=cfg.progress, policy_entry=entry)
    # a prompt's tail and a response's head fit its context (reward.max_*_tokens, else data.max_*_tokens)
    check_reward_context(reward_model, *(f"reward.{k}" if cfg.reward.get(k) is not None else f"data.{k}"
                                         for k in ("max_prompt_tokens", "max_response_tokens")))
    return reference, tokenizer, reward_model, lora


def build_solver(cfg: DictConfig) -> Solver:
    """The `solver` node of conf/solver/<name>.yaml, instantiated (its `_target_`: a `Solver`)."""
    solver = instantiate(cfg.solver, _convert_="all")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver._target_={cfg.solver.get('_target_')} built a {type(solver).__name__}, not a "
                        "infalign.trainer.solvers.Solver (docs/solvers.md)")
    if not solver.uses_transform and solver.target_metric not in ("bon", "won"):
        raise TypeError(f"{type(solver).__name__} uses no transform: its target_metric must be bon or won, got "
                        f"{solver.target_metric!r} (docs/solvers.md)")
    return solver


def calibration_key(cfg: DictConfig, partitions, prompt_ids: list[str], gen_kwargs: dict) -> dict:
    """What the calibration cache's reference samples and rewards depend on (its content address)."""
    # version 3: batch seeds from infalign.runtime.seeds; version 2: samples no longer take the model's own
    # generation_config processors (repetition penalty, ...)
    # model.lora and model.gradient_checkpointing shape the trained policy only: the reference samples are the base's
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in POLICY_ONLY_KEYS}
    return {"version": 3, "model": model,
            # how many pairs share a forward pass changes float rounding only, not what is scored
            "reward": {k: v for k, v in OmegaConf.to_container(cfg.reward, resolve=True).items()
                       if k != "max_batch_tokens"},
            "data": partition_fingerprint(partitions), "max_prompt_tokens": int(cfg.data.max_prompt_tokens),
            "prompts": fingerprint(prompt_ids), "m": int(cfg.calibration.m), "seed": int(cfg.calibration.seed),
            "generation": gen_kwargs}


def sample_sets(cfg: DictConfig, partitions, train: list[Prompt], held_out: list[Prompt], models: dict,
                gen_kwargs: dict, with_pool: bool) -> tuple[CachedSamples, CachedSamples | None]:
    """The calibration cache (M reference samples of every training and evaluation prompt) and, `with_pool`, the
    distillation pool (distill.m of every training prompt: its own entry, its own seeds), each one object that
    loads or builds its entry once (`CachedSamples.get`: in the DataModule's setup, where under DDP every process
    and the process group exist, so the ranks share the generation and rank 0 stores it once).
    `models`: reference, tokenizer, reward_model."""

    def cached(prompts: list[Prompt], key: dict, m: int, prompts_per_batch: int, **kw) -> CachedSamples:
        return CachedSamples(cache_root=cfg.cache_root, key=key, prompt_ids=[p.id for p in prompts],
                             prompts=[p.text for p in prompts], reward_prompts=[p.reward_text for p in prompts],
                             m=m, gen_kwargs=gen_kwargs, seed=int(cfg.calibration.seed),
                             prompts_per_batch=prompts_per_batch, progress=cfg.progress, **models, **kw)

    everything = train + held_out
    calibration = cached(everything, calibration_key(cfg, partitions, [p.id for p in everything], gen_kwargs),
                         int(cfg.calibration.m), int(cfg.calibration.prompts_per_batch))
    if not with_pool:
        return calibration, None
    m = int(cfg.distill.m)
    key = {**calibration_key(cfg, partitions, [p.id for p in train], gen_kwargs), "m": m,
           "stream": "distill_pool", "token_ids": 1}  # token_ids: entries that store the sampled paths
    return calibration, cached(train, key, m, int(cfg.distill.prompts_per_batch), stream="distill_pool",
                               what="distillation pool")


def save_policy(policy, tokenizer, out: Path, merged=None) -> None:
    """save_pretrained (safetensors) into a temp dir, then an atomic rename over the old one. The files get the
    mode a plain write gives (0o666 less the umask; safetensors alone writes model.safetensors owner-only).
    With LoRA `policy` is the peft model (its files: adapter_config.json, adapter_model.safetensors) and `merged`,
    when asked for (model.lora.save_merged), the merged model, written with the tokenizer to `merged/`."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with write_errors(out):  # a full disk: one line naming the folder (safetensors says "I/O error")
            policy.save_pretrained(tmp, safe_serialization=True)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:  # padding/truncation are what the last encode call left (each call sets its
                backend.no_padding()  # own): saved, tokenizer.json would depend on the run's history
                backend.no_truncation()
            tokenizer.save_pretrained(tmp)
            if merged is not None:  # its own folder: beside adapter_config.json, transformers would load the adapter
                merged.save_pretrained(tmp / "merged", safe_serialization=True)
                tokenizer.save_pretrained(tmp / "merged")
            give_plain_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
