"""Log-probs of sampled responses under a model: `response_logprobs`, for the policy (with gradients), the
reference and the evaluation's KL; position ids skip the left padding, as in `infalign.models.sampling`.

The LM head runs only on the positions that predict response tokens, up to the longest response. Samples that
share a prompt share its forward pass (its keys/values fanned out to them; gradients flow back through the
fan-out), except under gradient checkpointing, where a checkpointed layer would drop that cache. Full-vocabulary
scores are held at most `LOGITS_BUDGET` bytes at a time, recomputed in the backward pass from the much smaller
hidden states (`torch.utils.checkpoint`): for SmolLM2 (49,152 tokens) one 32 x 64-token minibatch holds 403 MB of
fp32 scores per copy (docs/benchmarks.md, SmolLM2). The tiny model's vocabulary fits in one piece.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from infalign.models.kv_cache import _run
from infalign.models.sampling import Rollout

__all__ = ["LOGITS_BUDGET", "response_logprobs"]

LOGITS_BUDGET = 128 * 2**20  # bytes of fp32 scores per chunk of positions


def _shared_prompt_groups(ids: torch.Tensor, mask: torch.Tensor, head: int):
    """(one row per distinct prompt prefix, the prefix row of each sequence), or None if none repeats."""
    key = torch.cat([ids[:, :head], mask[:, :head]], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(ids):
        return None
    # any representative row will do: rows with the same key are identical
    first = torch.empty(len(distinct), dtype=torch.long, device=ids.device)
    first.scatter_(0, inverse, torch.arange(len(ids), device=ids.device))
    return first, inverse


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def _checkpointing(model) -> bool:
    """Whether a forward of `model` now runs its decoder layers under gradient checkpointing (transformers'
    activation checkpointing, switched on for the update by `infalign.models.lora.update_passes`). Such a layer
    drops the KV cache it is given, so the prompt cannot be shared through one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return torch.is_grad_enabled() and any(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
                                           and m.training for m in model.modules())


def _plain_head(model) -> torch.nn.Module | None:
    """The output layer when the model's scores are exactly `head(last hidden state)`, else None (then the
    model's own forward computes them: soft-capped or rescaled logits, e.g. Gemma 2, Cohere)."""
    config = getattr(model, "config", None)
    if (getattr(config, "final_logit_softcapping", None) is not None
            or getattr(config, "logit_scale", None) not in (None, 1.0)):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Linear) else None


def _response_states(model, rollout: Rollout, head: torch.nn.Module | None) -> tuple[torch.Tensor, int]:
    """At the W positions that predict the response tokens (W = the longest response among these rows): the last
    hidden states `[S, W, H]` when `head` is given (the scores are `head` of them), else the scores `[S, W, V]`."""
    full_width = rollout.response_mask.shape[1]
    width = int(rollout.response_mask.sum(-1).max()) if full_width else 0
    ids = rollout.input_ids[:, : rollout.prompt_len + width]
    mask = rollout.attention_mask[:, : rollout.prompt_len + width]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    first_position = rollout.prompt_len - 1
    body = model.base_model if head is not None else model
    # under gradient checkpointing each sequence runs its own prompt: a checkpointed layer would drop the shared cache
    groups = (_shared_prompt_groups(ids, mask, first_position)
              if first_position > 0 and width and not _checkpointing(model) else None)
    if groups is None:
        kwargs = {} if head is not None else {"logits_to_keep": width + 1}
        out = body(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs)
        states = out.last_hidden_state[:, -(width + 1):] if head is not None else out.logits
        return states[:, :-1], width
    first, inverse = groups
    cache = DynamicCache()
    _run(model.base_model, cache, input_ids=ids[first, :first_position], attention_mask=mask[first, :first_position],
         position_ids=position_ids[first, :first_position])
    # each row's copy of its prompt's cache; autograd sums the rows' gradients back. index_select, not the cache's
    # batch_select_indices: the backward of advanced indexing adds them with atomic adds across CPU threads, in no
    # fixed order (tests/test_logprobs.py::test_gradients_are_bit_identical_on_several_threads)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse)
    out = _run(body, cache, input_ids=ids[:, first_position:-1], attention_mask=mask[:, :-1],
               position_ids=position_ids[:, first_position:-1])
    return (out.last_hidden_state if head is not None else out.logits), width


def _gather(logp_all: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """log p(target) and (detached) entropy from a full log-softmax."""
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, -(logp_all.exp() * logp_all).sum(-1)


def _chunk_scores(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """log p(target) and (detached) entropy of one chunk of positions: `head`, log-softmax and gather."""
    return _gather(torch.log_softmax(head(hidden).float(), dim=-1), targets, with_entropy)


def _chunked_scores(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool,
                    budget: int):
    """`_chunk_scores` over chunks of at most `budget` bytes of fp32 scores; with gradients, each chunk's scores
    are recomputed in the backward pass from its hidden states (checkpointed) instead of kept."""
    s, w = targets.shape
    per_chunk = max(1, budget // (4 * head.out_features))
    flat_hidden, flat_targets = hidden.reshape(s * w, -1), targets.reshape(-1)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    logps, entropies = [], []
    for start in range(0, s * w, per_chunk):
        chunk = (flat_hidden[start:start + per_chunk], flat_targets[start:start + per_chunk])
        if grad:
            logp, entropy = checkpoint(_chunk_scores, head, *chunk, with_entropy, use_reentrant=False)
        else:
            logp, entropy = _chunk_scores(head, *chunk, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view(s, w)
    return logp, (torch.cat(entropies).view(s, w) if with_entropy else None)


def response_logprobs(model, rollout: Rollout, *, with_entropy: bool = False, full_vocabulary: bool = False,
                      budget: int = LOGITS_BUDGET):
    """log pi(y_t | x, y_<t) for the response tokens, `[S, T]` (0 where masked).

    With `with_entropy`, also returns the per-token entropy of the policy (for logging; computed without grad).
    With `full_vocabulary`, also returns the whole log-softmax `[S, W, V]` over the first W response columns
    (W = the longest response here; later columns are padding in every row), for the exact per-token KL
    (`infalign.core.losses.token_kl`, `rl.kl_penalty=exact`): that mode holds the whole batch's scores.
    Otherwise the scores are computed in chunks of at most `budget` bytes (see the module docstring).
    """
    full_width = rollout.response_mask.shape[1]
    head = _plain_head(model)
    states, width = _response_states(model, rollout, head)
    response_mask, response_ids = rollout.response_mask[:, :width], rollout.response_ids[:, :width]
    logp_all = None
    if head is not None and not full_vocabulary and states.shape[0] * width * head.out_features * 4 > budget:
        logp, entropy = _chunked_scores(head, states, response_ids, with_entropy, budget)
    else:  # fits the budget (or the whole log-softmax is asked for): one piece, nothing recomputed
        logp_all = torch.log_softmax((head(states) if head is not None else states).float(), dim=-1)
        logp, entropy = _gather(logp_all, response_ids, with_entropy)
    out = (_pad_columns(logp * response_mask, full_width),)
    if with_entropy:
        out += (_pad_columns(entropy * response_mask, full_width),)
    if full_vocabulary:
        out += (logp_all,)
    return out[0] if len(out) == 1 else out
