"""Reward models behind one interface: ``score(prompts, responses) -> Tensor[B]`` (float32, no grad, eval).

:class:`SequenceClassifierReward` is any ``AutoModelForSequenceClassification`` with one output (``reward=hf``, and
the fine-tuned GPT-2 of ``reward.backbone=policy``); :mod:`infalign.models.reward_embedding` has the frozen encoder
with a trained head. Every reward model takes text and uses its own tokenizer, so it can score any policy's samples.
"""
from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from infalign.models.checks import ConfigError, check_weights, context_of, ensure_pad_token

Precision = Literal["fp32", "bf16"]
PRECISIONS = typing.get_args(Precision)
# Padded tokens per forward pass. Measured on the default MiniLM reward, one rollout of 64 pairs on 2 cores
# (bench/reward_scoring.py, docs/benchmarks.md section 6): 1.73 s at 2048, 1.80 at 4096, 2.55 at 8192, 2.72 at
# 16384: past a few thousand tokens the attention scores and activations leave the cache.
DEFAULT_BATCH_TOKENS = 2048


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length: longest first, each batch at most `max_tokens`
    padded tokens (rows x its longest row; a row longer than the budget goes alone)."""
    if max_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # sorted longest first: a batch's first row sets its width
        if batches and (len(batches[-1]) + 1) * max(1, lengths[batches[-1][0]]) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def forward_by_length(lengths: Sequence[int], fn: Callable[[list[int]], torch.Tensor], max_tokens: int) -> torch.Tensor:
    """`fn(indices) -> Tensor[len(indices), ...]` over length-sorted batches (little padding), returned as one
    float32 tensor in the order of `lengths`."""
    out = None
    for batch in length_batches(lengths, max_tokens):
        y = fn(batch).float()
        if out is None:
            out = y.new_empty((len(lengths), *y.shape[1:]))
        out[torch.tensor(batch, device=y.device)] = y
    return out


class RewardModel(ABC):
    """Scores (prompt, response) text pairs; higher is better.

    All pairs of a call are tokenised once and run in batches of similar length (`max_batch_tokens` padded
    tokens each), so padding costs little; `precision` is the frozen model's compute precision.
    """

    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    precision: Precision = "fp32"
    device: torch.device = torch.device("cpu")
    source: str = "the reward model"  # the key that chose it (reward.name_or_path=..., reward.backbone=...), for messages

    def context_use(self) -> tuple[int, int, int, tuple[int, str] | None] | None:
        """What one scored pair takes at most: ``(prompt tokens, response tokens, tokens beside them, the model's
        context as infalign.models.checks.context_of gives it)``; None where no limit is known."""
        return None

    @abstractmethod
    def _score_all(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards of all pairs, in the order given."""

    @abstractmethod
    def modules(self) -> list[nn.Module]: ...

    def configure(self, *, precision: Precision | None = None, max_batch_tokens: int | None = None) -> RewardModel:
        """Set the scoring precision and batch budget (the reward configs' `precision`, `max_batch_tokens`)."""
        if precision is not None:
            if precision not in PRECISIONS:
                raise ValueError(f"reward.precision must be one of {PRECISIONS}, got {precision!r}")
            self.precision = precision
        if max_batch_tokens is not None:  # length_batches refuses one below 1
            self.max_batch_tokens = int(max_batch_tokens)
        return self

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        for m in self.modules():
            m.eval()
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        # the model's own precision wherever it scores, whatever the trainer's (fp32: any surrounding autocast off),
        # so that rewards compared with each other (a rollout's and the cached reference's) are scored alike
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self._score_all(list(prompts), list(responses)).float().cpu()

    __call__ = score

    def to(self, device: str | torch.device) -> RewardModel:
        self.device = torch.device(device)
        for m in self.modules():
            m.to(self.device)
        return self


def _token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, each distinct text tokenised once (a rollout repeats each prompt k times)."""
    distinct = list(dict.fromkeys(texts))
    # verbose=False: long prompts exceed the model's max length here by design, we keep only their tail
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False, verbose=False)["input_ids"])) if distinct else {}
    return [ids[t] for t in texts]


def _tail_ids(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_prompt_tokens: int,
              max_response_tokens: int, append_eos: bool) -> list[list[int]]:
    """Per pair: the last ``max_prompt_tokens`` prompt ids + the first ``max_response_tokens`` response ids.

    Cutting the prompt from the left keeps the turn being answered; an earlier turn cut mid-way is harmless
    for a scorer (generation-side truncation in :mod:`infalign.models.data` is turn-aligned instead).
    """
    p, r = _token_ids(tokenizer, prompts), _token_ids(tokenizer, responses)
    eos = [tokenizer.eos_token_id] if append_eos else []
    return [_cut(pi, max_prompt_tokens) + ri[:max_response_tokens] + eos for pi, ri in zip(p, r)]


def _cut(ids: list[int], keep_last: int) -> list[int]:
    return ids[max(0, len(ids) - keep_last):] if keep_last > 0 else []


def _pad(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


# ------------------------------------------------------------------------------ sequence classifiers
class SequenceClassifierReward(RewardModel):
    """A ``*ForSequenceClassification`` model; the reward is logit ``label_index``.

    ``input_format``: ``concat`` scores ``prompt + response`` as one text (decoder RMs, our GPT-2 reward);
    ``pair`` passes them as a text pair (encoder RMs trained on (question, answer) pairs).
    """

    def __init__(self, model: nn.Module, tokenizer, *, input_format: str = "concat", label_index: int = 0,
                 max_prompt_tokens: int = 192, max_response_tokens: int = 64, append_eos: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.input_format, self.label_index = input_format, label_index
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        self.append_eos = append_eos
        ensure_pad_token(tokenizer, "reward.name_or_path")  # hf_reward checked it first, naming the folder
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool the last non-pad

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def context_use(self):
        # concat: the prompt's tail, the response's head and the EOS appended; pair: truncated to the two budgets'
        # sum, the tokenizer's [CLS]/[SEP] included
        extra = int(self.append_eos) if self.input_format == "concat" else 0
        return self.max_prompt_tokens, self.max_response_tokens, extra, context_of(self.model.config)

    def _rows(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, list[int]]]:
        """Unpadded model inputs per pair."""
        if self.input_format == "pair":
            enc = self.tokenizer(list(prompts), list(responses), truncation="only_first",
                                 max_length=self.max_prompt_tokens + self.max_response_tokens)
            return [{k: enc[k][i] for k in enc.keys() if k != "attention_mask"} for i in range(len(prompts))]
        rows = _tail_ids(self.tokenizer, prompts, responses, self.max_prompt_tokens, self.max_response_tokens,
                         self.append_eos)
        return [{"input_ids": r} for r in rows]

    def _collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if self.input_format == "pair":  # the tokenizer pads every field it made (token_type_ids too)
            self.tokenizer.padding_side = "right"
            return dict(self.tokenizer.pad(rows, return_tensors="pt"))
        ids, mask = _pad([r["input_ids"] for r in rows], self.tokenizer.pad_token_id, "right")
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """One padded batch of the pairs, in order (for training the model; scoring batches by length)."""
        return self._collate(self._rows(prompts, responses))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).logits[:, self.label_index]

    def _score_all(self, prompts, responses):
        rows = self._rows(prompts, responses)

        def run(idx: list[int]) -> torch.Tensor:
            batch = self._collate([rows[i] for i in idx])
            return self.forward({k: v.to(self.device) for k, v in batch.items()})

        return forward_by_length([len(r["input_ids"]) for r in rows], run, self.max_batch_tokens)


# ------------------------------------------------------------------------------------------- loaders
def load_reward_model(reward_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any] | None = None,
                      model_cfg: Mapping[str, Any] | None = None, cache_root: str | Path | None = None, *,
                      partitions=None, progress: bool = True, policy_entry=None) -> RewardModel:
    """The reward model for ``cfg.reward``; a ``trained`` one is built and cached first if missing. ``model_cfg``
    is needed only when the reward's backbone is the reference policy; ``policy_entry``, that policy's cache entry
    when the caller has loaded it (``load_policy(..., return_entry=True)``), spares reading its weights again."""
    from infalign.models.loaders import call_loader

    rm, _ = call_loader(reward_cfg, "reward", data_cfg=data_cfg, model_cfg=model_cfg, cache_root=cache_root,
                        partitions=partitions, progress=progress, policy_entry=policy_entry)
    return rm


def hf_reward(*, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
              input_format: Literal["concat", "pair"] = "concat", label_index: int = 0, max_prompt_tokens: int = 384,
              max_response_tokens: int = 128, precision: Precision = "fp32",
              max_batch_tokens: int = DEFAULT_BATCH_TOKENS) -> tuple[RewardModel, None]:
    """``reward=hf``: any ``AutoModelForSequenceClassification`` by hub name or local folder, scored in
    ``precision`` in batches of at most ``max_batch_tokens`` padded tokens."""
    check_weights("reward.name_or_path", name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    ensure_pad_token(tok, f"reward.name_or_path={name_or_path}")  # before the weights load
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code, output_loading_info=True)
    _refuse_missing_weights(name_or_path, model, info["missing_keys"])
    rm = SequenceClassifierReward(model, tok, input_format=input_format, label_index=label_index,
                                  max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                                  ).configure(precision=precision, max_batch_tokens=max_batch_tokens)
    rm.source = f"reward.name_or_path={name_or_path}"
    return rm, None


def _refuse_missing_weights(name_or_path: str, model: nn.Module, missing_keys) -> None:
    """Refuse a reward model whose saved weights lack some of its parameters: transformers would initialise them
    at random with only a load report (a causal LM folder loads with a random ``score.weight`` head). The keys a
    model may lack by design (tied weights, ``_keys_to_ignore_on_load_missing``) are not reported."""
    if not missing_keys:
        return
    saved = ", ".join(getattr(model.config, "architectures", None) or []) or "a model"
    keys = sorted(missing_keys)
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    raise ConfigError(
        f"reward.name_or_path={name_or_path}: it holds {saved}, whose weights lack {shown} of "
        f"{type(model).__name__} (transformers would initialise them at random and the rewards would be noise); "
        "point reward.name_or_path at a sequence-classification reward model (AutoModelForSequenceClassification "
        "with num_labels=1)")
