"""The checks that need a model's own files or its loaded config, as soon as they are read and before anything is
computed with them: one-line ``ConfigError`` naming the key or folder (``train.py`` prints ``error: ...`` and exits
2). What the config alone shows (a missing folder, no ``config.json``) is refused earlier,
:mod:`infalign.runtime.model_paths`. Refused here: a folder with ``config.json`` but no weights (transformers would
fail five frames deep), a tokenizer with neither a pad nor an EOS token, and a context shorter than the tokens a
model is fed (a position past the model's table would end in ``IndexError: index out of range in self``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infalign.runtime.errors import ConfigError

__all__ = ["ConfigError", "check_context", "check_reward_context", "check_weights", "context_of", "ensure_pad_token",
           "fitting_budgets", "refuse_reward_context"]

# What `from_pretrained` reads from a local folder (transformers.utils' SAFE_WEIGHTS_NAME, ..._INDEX_NAME,
# WEIGHTS_NAME, ..._INDEX_NAME): one of them, or a file the config names itself (`transformers_weights`)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Absolute position tables that start counting after the pad id (RoBERTa's family): `max_position_embeddings`
# includes those pad_token_id + 1 positions, which no token can take
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
                     "longformer", "ernie_m", "luke", "mpnet")


def check_weights(key: str, name_or_path: Any) -> None:
    """Refuse a local model folder that holds ``config.json`` but no weights file ``from_pretrained`` reads.

    A hub id (no such local folder) is left to transformers; a folder without ``config.json`` is the config
    schema's (``infalign.runtime.model_paths``)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        return
    folder = Path(name_or_path).expanduser()
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file() or any((folder / name).is_file() for name in WEIGHT_FILES):
        return
    try:
        if json.loads(config.read_text()).get("transformers_weights"):
            return  # the config names its weights file: transformers reads (or refuses) that
    except (OSError, ValueError):
        pass
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".h5", ".msgpack", ".ckpt", ".pt", ".pth", ".gguf")
                    or p.name.endswith(".ckpt.index"))
    found = (f"only {', '.join(others)}, which transformers does not load as a model's weights" if others
             else "no weights")
    raise ConfigError(f"{key}={name_or_path}: the folder {folder.resolve()} holds config.json but {found} "
                      f"({' or '.join(WEIGHT_FILES[::2])} expected); point {key} at the folder save_pretrained "
                      "wrote (model.save_pretrained(folder) writes the weights beside config.json)")


def ensure_pad_token(tokenizer, key: str, *, policy: bool = False) -> None:
    """Give a tokenizer without a pad token its EOS token as one (the usual stand-in: padded positions are masked
    out). Refused, naming ``key``: a tokenizer with neither, and a policy's without an EOS token (its samples end
    with EOS: without one none could end, and the sampler has no token to stop on)."""
    if tokenizer.eos_token is None and (policy or tokenizer.pad_token is None):
        name = getattr(tokenizer, "name_or_path", "") or "?"
        has = "a pad token but no EOS token" if tokenizer.pad_token is not None else "neither a pad token nor an EOS token"
        needs = ("a policy needs an EOS token (a sample ends with it) and a pad token (EOS when there is none) for "
                 "batched generation" if policy else "the reward model needs a pad token (EOS when there is none) "
                 "to batch the pairs it scores")
        raise ConfigError(
            f"{key}: the tokenizer {name} has {has}; {needs}. Use a tokenizer that defines them: save it with "
            "tokenizer.eos_token (and tokenizer.pad_token) set, as the model was trained"
            + (", and point model.tokenizer_name_or_path at its folder" if policy else " into that folder"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def context_of(config) -> tuple[int, str] | None:
    """``(positions, the config field)`` a model can take in one sequence, or None when its config sets no limit
    (no absolute position table: DeBERTa-v2's relative positions, ``position_biased_input=false``)."""
    if getattr(config, "position_biased_input", True) is False:
        return None
    for field in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if field == "max_position_embeddings" and getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                pad = getattr(config, "pad_token_id", None)
                offset = (pad if isinstance(pad, int) else 1) + 1
                return value - offset, f"{field}={value} less the {offset} positions before the first token"
            return value, f"{field}={value}"
    return None


def fitting_budgets(context: int, first: int, second: int, extra: int = 0) -> tuple[int, int]:
    """Two token budgets that fit ``context`` with ``extra`` tokens beside them: the second kept up to a quarter
    of the context, the first taking the rest (an example for a message)."""
    room = max(2, context - extra)
    b = max(1, min(second, room // 4))
    return max(1, min(first, room - b)), b


def check_context(need: int, what: str, context: tuple[int, str] | None, model: str, fix: str) -> None:
    """Refuse ``need`` tokens (``what``: the keys that sum to it) beyond ``context`` (:func:`context_of`) of
    ``model`` (the key naming it); ``fix``: what to set instead."""
    if context is None or need <= context[0]:
        return
    raise ConfigError(f"{what} = {need} exceeds the context of {model}: {context[0]} positions ({context[1]} in "
                      f"its config): the longest sequence would run past the positions it was built for; {fix}")


def check_reward_context(rm, prompt_key: str = "reward.max_prompt_tokens",
                         response_key: str = "reward.max_response_tokens") -> None:
    """Refuse a reward model (an `infalign.models.reward.RewardModel`) whose context is shorter than one scored
    pair: the prompt's tail (``prompt_key``), the response's head (``response_key``) and the tokens its input
    format adds."""
    use = rm.context_use()
    if use is not None:
        refuse_reward_context(*use, rm.source, prompt_key, response_key)


def refuse_reward_context(prompt_tokens: int, response_tokens: int, extra: int, context: tuple[int, str] | None,
                          source: str, prompt_key: str, response_key: str) -> None:
    """:func:`check_reward_context` for a model not loaded yet (``context``: :func:`context_of` of its config)."""
    if context is None:
        return
    a, b = fitting_budgets(context[0], prompt_tokens, response_tokens, extra)
    fix = f"lower them to fit, e.g. {prompt_key}={a} {response_key}={b}"
    if prompt_key.startswith("data."):  # reward=trained with null budgets: they can be the reward's own
        fix += f" (or reward.max_prompt_tokens={a} reward.max_response_tokens={b}, for the reward model alone)"
    added = f" (+ {extra} the input format adds)" if extra else ""
    check_context(prompt_tokens + response_tokens + extra, f"{prompt_key} + {response_key}{added}", context, source,
                  fix)
