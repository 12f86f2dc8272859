"""Build (or find in the cache) the tokenizer, reference policy and reward model: ``python -m infalign.models.build``.

    python -m infalign.models.build                           # defaults: data=hh_rlhf model=tiny reward=trained
    python -m infalign.models.build model=smollm2 reward.backbone=policy_frozen
    python -m infalign.models.build scale=smoke               # seconds-sized models, for tests and smoke runs
    python -m infalign.models.build stages=[policy] samples=4 # only the reference, then sample 4 test prompts

Every stage is content-addressed in the cache (``cache_root``, default ``$INFALIGN_CACHE`` or
``<repo>/.cache``): whatever is already built for this exact configuration is loaded, not rebuilt. The trainer
calls the same loaders (``load_partitions``, ``load_policy``, ``load_reward_model``) and so triggers the same
builds on a fresh machine.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from infalign.config.check import check_section, source
from infalign.config.schema import DATA
from infalign.models.data import load_partitions, partition_fingerprint
from infalign.models.loaders import call_loader, check_loader_config
from infalign.models.policy import format_prompts
from infalign.runtime.artifacts import atomic_write_text
from infalign.runtime.errors import ConfigError, UserError, exit_on_user_error
from infalign.runtime.paths import conf_dir

log = logging.getLogger("infalign.models.build")
STAGES = ("policy", "reward")


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, prompt_format: str = "raw",
                     max_prompt_tokens: int | None = None, seed: int = 0) -> list[str]:
    """Sampled responses to HH prompts: pure samples of the model (`infalign.models.sampling.generate`, as the
    RL stage, the calibration cache and best-of-N evaluation sample)."""
    from infalign.models.prompt_text import truncate_prompt
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import decode_responses, generate

    if max_prompt_tokens:
        prompts = [truncate_prompt(p, tokenizer, max_prompt_tokens) for p in prompts]
    texts = format_prompts(prompts, tokenizer, prompt_format)
    torch.manual_seed(seed)
    rollout = generate(model, tokenizer, texts, 1, sampling_kwargs({"max_new_tokens": max_new_tokens}))
    return decode_responses(tokenizer, rollout)


def build_all(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Run the configured stages; returns a JSON-able summary (cache paths, hits, metrics, timings)."""
    stages = list(cfg.get("stages", STAGES))
    if unknown := set(stages) - set(STAGES):
        raise ConfigError(f"stages: unknown stages {sorted(unknown)}; choose from {list(STAGES)}, e.g. stages=[policy]")
    # an unknown key, a bad value: refused before any work, as train.py's config check does
    check_section(OmegaConf.to_container(cfg.data, resolve=True), DATA, "data", source("data", None))
    check_loader_config(cfg.model, "model")
    check_loader_config(cfg.reward, "reward")
    cache_root = cfg.get("cache_root")
    summary: dict[str, Any] = {"cache_root": str(cache_root), "stages": {}}
    t0 = time.time()

    def built(stage: str, what: str, t: float, entry) -> None:
        summary["stages"][stage] = {"seconds": round(time.time() - t, 1), "path": str(entry.path) if entry else None,
                                    "cache_hit": entry.hit if entry else None, "meta": entry.meta if entry else {}}
        log.info("%s ready (%.1f s): %s", what, time.time() - t,
                 {k: v for k, v in summary["stages"][stage]["meta"].items() if k != "history"})

    parts = load_partitions(cfg.data)  # fails fast (missing data root) before any model work
    summary["data"] = {"fingerprint": partition_fingerprint(parts), **{k: len(v) for k, v in parts.items()}}
    model = tok = policy_entry = None
    if "policy" in stages or cfg.get("samples", 0):
        t = time.time()
        model, tok, entry = call_loader(cfg.model, "model", data_cfg=cfg.data, cache_root=cache_root,
                                        partitions=parts, progress=progress)
        policy_entry = entry  # the reward stage's backbone (policy, policy_frozen) reads it, not the weights again
        built("policy", "reference policy", t, entry)
    if "reward" in stages:
        t = time.time()
        _, entry = call_loader(cfg.reward, "reward", data_cfg=cfg.data, model_cfg=cfg.model, cache_root=cache_root,
                               partitions=parts, progress=progress, policy_entry=policy_entry)
        built("reward", "reward model", t, entry)
    if n := int(cfg.get("samples", 0)):
        prompts = [r.prompt for r in parts["test"][:n]]
        responses = sample_responses(model, tok, prompts, int(cfg.data.max_response_tokens),
                                     cfg.model.get("prompt_format", "raw"), cfg.data.get("max_prompt_tokens"),
                                     seed=int(cfg.get("seed", 0)))
        summary["samples"] = [{"prompt": p[-300:], "response": r} for p, r in zip(prompts, responses)]
        for s in summary["samples"]:
            log.info("sample\n...%s\n  -> %r", s["prompt"][-200:], s["response"])
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


@hydra.main(config_path=conf_dir(), config_name="build", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    log.info("build config:\n%s", OmegaConf.to_yaml(cfg))
    try:
        summary = build_all(cfg, progress=bool(cfg.get("progress", True)))
    except UserError as e:  # a refused key, file or model, a full disk: one line `error: ...`, exit 2, as train.py
        exit_on_user_error(e)
    out = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir) / "build_summary.json"
    atomic_write_text(out, json.dumps(summary, indent=2, default=str))
    log.info("summary written to %s (total %.1f s)", out, summary["seconds"])
    return summary


if __name__ == "__main__":
    main()
