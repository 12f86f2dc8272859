"""Sampling responses and scoring their tokens: `generate` with KV cache, log-probs on response positions.

Two traps handled here:
- The KL and the policy gradient assume the responses were drawn from the policy's own distribution, so
  rollouts sample at temperature 1 with no top-k / top-p (`infalign.models.pure_sampling` refuses anything else
  for training), otherwise the k1 KL estimate is biased and can go negative. `generate` also switches off every
  logits processor / warper that the checkpoint's own `generation_config` may set (repetition penalty,
  n-gram bans, minimum lengths, suppressed tokens, epsilon cutoff, ...: `pure_sampling.PURE_SAMPLING`) and refuses to
  sample if `model.generate` would still change the probabilities.
- Left-padded prompts need position ids that start at the first real token (as `generate` builds them);
  `response_logprobs` uses the same, so the scored distribution is the sampled one.

Two costs avoided (docs/benchmarks.md, section 3): the k samples of a prompt share its forward pass (once
per distinct prompt, its keys/values then fanned out to the k rows), in `generate` and in
`response_logprobs`, gradients included; and `generate` records the log-probs of the tokens it samples,
so the rollout needs no second forward pass of the policy for them.
No Lightning here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from infalign.models.pure_sampling import check_pure_sampling, generate_kwargs

__all__ = ["Rollout", "tokenize_prompts", "generate", "decode_responses", "response_logprobs"]


def tokenize_prompts(tokenizer, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (generation appends on the right)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


@dataclass
class Rollout:
    """k responses for each of P prompts, prompt-major (row = prompt * k + sample)."""

    input_ids: torch.Tensor  # [S, P_len + T]: left-padded prompt, then response (padded after EOS)
    attention_mask: torch.Tensor  # [S, P_len + T]
    response_mask: torch.Tensor  # [S, T]: real response tokens (EOS included, padding after it excluded)
    prompt_len: int
    logprobs: torch.Tensor | None = None  # [S, T] log pi(y_t) recorded while sampling (0 where masked), if asked
    entropy: torch.Tensor | None = None  # [S, T] entropy of pi at each sampled position (0 where masked)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


class _SampledLogProbs(LogitsProcessor):
    """Records log pi(y_t) of each sampled token and the entropy of pi at each step, inside `generate`.

    A logits processor sees each step's scores before the token is drawn; the drawn tokens show up as the
    last input ids of later calls (the final ones in `finish`). The scores are kept by reference and turned
    into log-probs a chunk of steps at a time, up to `budget_bytes` of them: one large op instead of several
    small ones per decoding step, which matters on a few busy CPU cores where every op pays for a thread
    barrier. Custom processors run after the model's own and before the sampling warpers; `generate` switches
    both off (`PURE_SAMPLING`, whatever the checkpoint's `generation_config` sets, and checks that none is
    left): these are the probabilities the tokens were drawn from.
    """

    def __init__(self, budget_bytes: int = 256 * 2**20):
        self.budget, self.pending, self.logps, self.entropies = budget_bytes, [], [], []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending and (len(self.pending) + 1) * scores.numel() * 4 > self.budget:
            self._flush(input_ids[:, -len(self.pending):])
        self.pending.append(scores)
        return scores

    def _flush(self, tokens: torch.Tensor) -> None:
        logp = torch.log_softmax(torch.stack(self.pending, 1).float(), dim=-1)  # [S, C, V]
        self.logps.append(logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        self.entropies.append(-(logp.exp() * logp).sum(-1))
        self.pending = []

    def finish(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending:
            self._flush(response[:, -len(self.pending):])
        return torch.cat(self.logps, 1), torch.cat(self.entropies, 1)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def _shared_prompt_cache(model, batch: dict[str, torch.Tensor], k: int):
    """Keys/values of each prompt but its last token, computed once and repeated for its k samples.

    `generate` with `num_return_sequences=k` would run the prompt k times; with this cache it runs only the
    last prompt token (which yields the first sampled token's distribution). Position ids as `generate`
    builds them for left padding.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model.base_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                           use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    return cache


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], k: int, gen_kwargs: dict, *, record_logprobs: bool = False) -> Rollout:
    """Sample `k` responses per prompt (eval mode, no grad, KV cache).

    With `record_logprobs`, the rollout carries the sampled tokens' log-probs and the per-step entropy
    (in fp32 runs only: under autocast the scores are low-precision, and the caller rescores in fp32).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    recorder = _SampledLogProbs() if record_logprobs and not _autocast_on(device) else None
    try:
        batch = tokenize_prompts(tokenizer, prompts, device)
        call_kwargs = generate_kwargs(tokenizer, gen_kwargs)
        check_pure_sampling(model, call_kwargs, gen_kwargs, batch)
        inputs = {**batch, "num_return_sequences": k}
        # A static cache is allocated by generate itself, so the prompt is shared only with the dynamic one.
        if k > 1 and batch["input_ids"].shape[1] > 1 and not gen_kwargs.get("cache_implementation"):
            inputs = {name: t.repeat_interleave(k, dim=0) for name, t in batch.items()}
            inputs["past_key_values"] = _shared_prompt_cache(model, batch, k)
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([recorder] if recorder else []),
                             **call_kwargs)
    finally:
        model.train(was_training)
    prompt_len = batch["input_ids"].shape[1]
    response = out[:, prompt_len:]
    # A response ends at its first EOS (kept: the policy chose to stop); everything after is padding.
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    prompt_mask = batch["attention_mask"].repeat_interleave(k, dim=0)
    logprobs = entropy = None
    if recorder is not None:
        logprobs, entropy = (x * response_mask for x in recorder.finish(response))
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask,
        prompt_len=prompt_len,
        logprobs=logprobs,
        entropy=entropy,
    )


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts (special tokens and padding dropped), for a reward model with its own tokenizer."""
    ids = rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


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


def response_logprobs(model, rollout: Rollout, *, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) for the response tokens, `[S, T]` (0 where masked).

    The LM head runs only on the positions that predict response tokens, not on the prompt. When samples
    share a prompt (k per prompt), the prompt minus its last token runs once per distinct prompt and its
    keys/values are fanned out to the samples (gradients flow back through the fan-out, so the gradient is
    the same as with one full pass per sample); then the last prompt token and the response run per sample.
    Position ids skip the left padding, exactly as in `generate`. With `with_entropy`, also returns the
    per-token entropy of the policy (for logging; computed without grad).
    """
    ids, mask = rollout.input_ids, rollout.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    n_resp, head = ids.shape[1] - rollout.prompt_len, rollout.prompt_len - 1
    groups = _shared_prompt_groups(ids, mask, head) if head > 0 else None
    if groups is None:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=n_resp + 1,
                       use_cache=False).logits[:, :-1]
    else:
        first, inverse = groups
        cache = model.base_model(input_ids=ids[first, :head], attention_mask=mask[first, :head],
                                 position_ids=position_ids[first, :head], use_cache=True).past_key_values
        cache.batch_select_indices(inverse)  # an indexing op: autograd sums the k rows' gradients back
        logits = model(input_ids=ids[:, head:-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, head:-1],
                       past_key_values=cache, use_cache=True).logits
    logits = logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    target = rollout.response_ids.unsqueeze(-1)
    logp = logp_all.gather(-1, target).squeeze(-1) * rollout.response_mask
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1) * rollout.response_mask
    return logp, entropy
