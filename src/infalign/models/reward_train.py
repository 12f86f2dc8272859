"""``reward=trained``: the Bradley-Terry reward model built (training: :mod:`infalign.models.bradley_terry`), cached
under a key of everything that determines it, and loaded back. Backbones (``reward.backbone``): a frozen encoder
(``minilm``, ``smollm2``, ``policy_frozen``) with a small head trained on its features, or the reference policy's
GPT-2 fine-tuned end to end (``policy``). Models are selected on validation accuracy; the held-out test accuracy
goes into the cache manifest.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from infalign.models.bradley_terry import train_finetuned_policy, train_frozen_head
from infalign.models.checks import context_of, refuse_reward_context
from infalign.models.data import PARTITION_SOURCES, load_partitions, partition_fingerprint
from infalign.models.reward import DEFAULT_BATCH_TOKENS, Precision, RewardModel, SequenceClassifierReward
from infalign.models.reward_embedding import load_embedding_head_reward, minilm_path
from infalign.runtime.artifacts import get_or_build
from infalign.runtime.manifest import CacheEntry

log = logging.getLogger(__name__)
Backbone = Literal["minilm", "smollm2", "policy_frozen", "policy"]
FROZEN = ("minilm", "smollm2", "policy_frozen")


# -------------------------------------------------------------------------------------------- loader
def trained_reward_key(backbone: str, seed: int, train: Mapping, head: Mapping, partition_fp: str, max_p: int,
                       max_r: int) -> dict[str, Any]:
    """The cache key of a ``trained`` reward model (``<cache_root>/reward/<hash>``), less the reference policy's
    entry hash that the ``policy``/``policy_frozen`` backbones add. ``max_p``/``max_r``: the truncation of its
    training pairs (``reward.max_*_tokens``, else ``data.max_*_tokens``), which is also how it scores. Nothing
    of the RL run (rollout length ``generation.max_new_tokens``, prompt counts, ``rl.*``, ``eval.*``) is in it."""
    key: dict[str, Any] = {"kind": "bradley-terry", "version": 1, "backbone": backbone, "seed": int(seed),
                           "train": dict(train), "data": partition_fp, "max_prompt_tokens": int(max_p),
                           "max_response_tokens": int(max_r)}
    if backbone in FROZEN:
        key["head"] = dict(head)
    return key


def reward_key_sources(max_prompt_tokens: int | None = None, max_response_tokens: int | None = None) -> dict[str, str]:
    """The config keys behind each field of :func:`trained_reward_key` (named when a change rebuilds it)."""
    return {"backbone": "reward.backbone", "seed": "reward.seed", "train": "reward.train", "head": "reward.head",
            "data": PARTITION_SOURCES,
            "max_prompt_tokens": "reward.max_prompt_tokens" if max_prompt_tokens else "data.max_prompt_tokens",
            "max_response_tokens": "reward.max_response_tokens" if max_response_tokens else "data.max_response_tokens",
            "policy": "the reference policy's cache entry (model.*)"}


def trained_reward(*, backbone: Backbone = "minilm", head: Mapping | None = None,
                   train: Mapping | None = None, seed: int = 0, max_prompt_tokens: int | None = None,
                   max_response_tokens: int | None = None, precision: Precision = "fp32",
                   max_batch_tokens: int = DEFAULT_BATCH_TOKENS, data_cfg: Mapping | None = None,
                   model_cfg: Mapping | None = None, cache_root=None, partitions=None, progress: bool = True,
                   policy_entry: CacheEntry | None = None) -> tuple[RewardModel, CacheEntry]:
    """``reward=trained``: train (or load from the cache) the Bradley-Terry reward model on the training partition.

    ``max_prompt_tokens`` / ``max_response_tokens`` (in the reward model's own tokens) default to the data
    config's budgets; a shorter prompt tail makes frozen-feature extraction cheaper. ``precision`` and
    ``max_batch_tokens`` set how the model scores (not how it is trained: the cached model is the same).
    The ``policy`` / ``policy_frozen`` backbones are built on the reference policy's cache entry: ``policy_entry``,
    the one the caller loaded ``model_cfg`` from (the trainer's, ``infalign.trainer.pieces.load_models``); without
    it, ``model_cfg``'s loader is called here for it, which reads the policy's weights once more.
    """
    from omegaconf import DictConfig, OmegaConf

    if data_cfg is None:
        raise ValueError("the trained reward model needs data_cfg (cfg.data)")
    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    head, train = dict(head or {}), dict(train or {})
    parts = partitions if partitions is not None else load_partitions(data_cfg)
    max_p = int(max_prompt_tokens or data_cfg.get("max_prompt_tokens", 192))
    max_r = int(max_response_tokens or data_cfg.get("max_response_tokens", 64))
    key = trained_reward_key(backbone, seed, train, head, partition_fingerprint(parts), max_p, max_r)
    sources = reward_key_sources(max_prompt_tokens, max_response_tokens)
    policy_path = None
    if backbone in ("policy", "policy_frozen"):
        pentry = policy_entry
        if pentry is None:  # a caller that has not loaded the policy: its loader gives the entry (and the weights)
            if model_cfg is None:
                raise ValueError(f"reward.backbone={backbone} needs the reference policy config (cfg.model)")
            from infalign.models.loaders import call_loader

            _, _, pentry = call_loader(model_cfg, "model", data_cfg=data_cfg, cache_root=cache_root,
                                       partitions=parts, progress=progress)
        if pentry is None:
            raise ValueError(f"reward.backbone={backbone} needs a cached reference policy (model=tiny or smollm2)")
        policy_path, key["policy"] = pentry.path, pentry.hash
    # the backbone takes the budgets: refused now, not after minutes of training (or mid-way through scoring)
    refuse_reward_context(max_p, max_r, *_backbone_context(backbone, policy_path), f"reward.backbone={backbone}",
                          sources["max_prompt_tokens"], sources["max_response_tokens"])

    def build(out: Path) -> dict:
        log.info("training Bradley-Terry reward model (backbone %s) on %d pairs", backbone, len(parts["train"]))
        if backbone == "policy":
            m = train_finetuned_policy(out, policy_path, parts, train, seed, max_p, max_r, progress)
        else:
            m = train_frozen_head(out, backbone, parts, head, train, seed, max_p, max_r, progress, policy_path, cache_root,
                                  max_batch_tokens)
        log.info("reward model: validation accuracy %.3f, held-out test accuracy %.3f (%d pairs)",
                 m["val_acc"], m["test_acc"], len(parts["test"]))
        return {**m, "n_test": len(parts["test"]), "n_train": len(parts["train"])}

    entry = get_or_build(cache_root, "reward", key, build, sources=sources)
    rm = load_trained_reward(entry.path, policy_path=policy_path, cache_root=cache_root)
    rm.source = f"reward.backbone={backbone}"
    return rm.configure(precision=precision, max_batch_tokens=max_batch_tokens), entry


def _backbone_context(backbone: str, policy_path) -> tuple[int, tuple[int, str] | None]:
    """``(tokens its input adds to the two budgets, its context)`` of a backbone, from its config.json alone (no
    weights loaded). SmolLM2 (8192 positions) and a backbone not installed give no limit here: its loading says."""
    from transformers import AutoConfig

    if backbone == "minilm":
        try:
            path, extra = minilm_path(), 2  # [CLS] ... [SEP] around the mean-pooled rows
        except ModuleNotFoundError:
            return 0, None
    elif backbone in ("policy", "policy_frozen"):
        path, extra = policy_path, int(backbone == "policy")  # the fine-tuned one scores with an EOS appended
    else:
        return 0, None
    return extra, context_of(AutoConfig.from_pretrained(path))


def load_trained_reward(path: str | Path, policy_path=None, cache_root=None) -> RewardModel:
    path = Path(path)
    if (path / "head.json").is_file():
        return load_embedding_head_reward(path, cache_root=cache_root, policy_path=policy_path)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = json.loads((path / "reward.json").read_text())
    return SequenceClassifierReward(AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True),
                                    AutoTokenizer.from_pretrained(path), **spec)
