"""Pure samples of a policy with their log-probs: the KV-cached sampler of rollouts, calibration and evaluation.

The KL and the policy gradient assume responses drawn from the policy's own distribution, so `_sample` draws at
temperature 1 with no logits processor and never reads the checkpoint's `generation_config` (`pure_sampling`
refuses any other setting). Left-padded prompts get position ids that start at their first real token, as in
transformers' `generate` and `infalign.models.logprobs`. Why not `model.generate` (docs/benchmarks.md, sections
3 and 6): each prompt runs once for its k samples, keys/values go into room allocated once, ended rows leave the
batch, one random number is drawn per token, and the sampled tokens' log-probs come without a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infalign.models.kv_cache import _prompt_cache, _run
from infalign.models.pure_sampling import check_sampler_kwargs

__all__ = ["Rollout", "tokenize_prompts", "generate", "decode_responses", "rollout_from_tokens"]


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


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (`[rows, V]`), exactly from it: one uniform u per row, the first token whose
    cumulative probability exceeds u (in float64: in float32 the running sum's rounding, ~3e-8, would distort the
    rarest tokens' probabilities). One random number per row, not one per vocabulary entry as `torch.multinomial`
    draws (docs/benchmarks.md, section 6)."""
    cdf = probs.double().cumsum_(dim=-1)
    u = torch.rand(len(probs), 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max_(probs.shape[-1] - 1)


@torch.no_grad()
def _sample(model, batch: dict[str, torch.Tensor], k: int, max_new_tokens: int, eos_id: int, pad_id: int,
            record: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Ancestral sampling at temperature 1: `[S, T]` tokens (pad after EOS) and, with `record`, the log-prob
    of each sampled token and the entropy at each step (0 after EOS).

    Rows that have ended leave the batch (their keys/values are dropped from the cache once a quarter of the
    batch has ended): after RL the responses shorten (43 -> 15 tokens in the default run), and one long
    response kept all 64 rows decoding to the end. How a token is drawn: `_draw`.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    device, n_rows, prompt_len = ids.device, ids.shape[0] * k, ids.shape[1]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate builds them
    cache = _prompt_cache(model, ids, mask, position_ids, k, room=max_new_tokens)
    attention = torch.cat([mask.repeat_interleave(k, dim=0), mask.new_ones(n_rows, max_new_tokens)], dim=1)
    last_token = ids[:, -1:].repeat_interleave(k, dim=0)
    last_position = position_ids[:, -1:].repeat_interleave(k, dim=0)
    rows = torch.arange(n_rows, device=device)  # the cache's rows: sampled rows, in order
    tokens = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(n_rows, max_new_tokens, device=device) if record else None
    entropy = torch.zeros(n_rows, max_new_tokens, device=device) if record else None
    sampling = torch.ones(n_rows, dtype=torch.bool, device=device)  # per cache row
    steps = 0
    for t in range(max_new_tokens):
        logits = _run(model, cache, input_ids=last_token, attention_mask=attention[rows, : prompt_len + t],
                      position_ids=last_position + t, logits_to_keep=1).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        step = _draw(probs)
        step = torch.where(sampling, step, pad_id)
        tokens[rows, t] = step
        steps = t + 1
        if record:
            logp[rows, t] = torch.where(sampling, probs.gather(-1, step[:, None]).squeeze(-1).log(), 0.0)
            entropy[rows, t] = torch.where(sampling, torch.special.entr(probs).sum(-1), 0.0)
        sampling &= step != eos_id
        if not sampling.any():
            break
        if 4 * int(sampling.sum()) <= 3 * len(rows):  # drop ended rows from the cache (one copy of it)
            keep = sampling.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, sampling, last_position = rows[keep], sampling[keep], last_position[keep]
            step = step[keep]
        last_token = step[:, None]
    tokens = tokens[:, :steps]
    if record:
        logp, entropy = logp[:, :steps], entropy[:, :steps]
    return tokens, logp, entropy


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], k: int, gen_kwargs: dict, *, record_logprobs: bool = False) -> Rollout:
    """Sample `k` responses per prompt (eval mode, no grad, KV cache; pure samples: temperature 1, nothing
    of the checkpoint's `generation_config` applies).

    With `record_logprobs`, the rollout carries the sampled tokens' log-probs and the per-step entropy
    (in fp32 runs only: under autocast the scores are low-precision, and the caller rescores in fp32).
    `gen_kwargs`: `pure_sampling.sampling_kwargs`, refused unless they ask for pure samples.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    record = record_logprobs and not _autocast_on(device)
    try:
        batch = tokenize_prompts(tokenizer, prompts, device)
        check_sampler_kwargs(gen_kwargs)
        response, logprobs, entropy = _sample(model, batch, k, int(gen_kwargs["max_new_tokens"]),
                                              tokenizer.eos_token_id, tokenizer.pad_token_id, record)
        out = torch.cat([batch["input_ids"].repeat_interleave(k, dim=0), response], dim=1)
    finally:
        model.train(was_training)
    # A response ends at its first EOS (kept: the policy chose to stop); everything after is padding.
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    prompt_mask = batch["attention_mask"].repeat_interleave(k, dim=0)
    if logprobs is not None:
        logprobs, entropy = logprobs * response_mask, entropy * response_mask
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask,
        prompt_len=batch["input_ids"].shape[1],
        logprobs=logprobs,
        entropy=entropy,
    )


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts (special tokens and padding dropped), for a reward model with its own tokenizer."""
    ids = rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def rollout_from_tokens(tokenizer, prompts: list[str], tokens: torch.Tensor, lengths: torch.Tensor) -> Rollout:
    """A `Rollout` of stored sampled responses: `tokens[i, j, :lengths[i, j]]` is the j-th response to
    `prompts[i]`, its token ids as they were drawn (EOS included where the sample ended by choice), laid out
    as `generate` lays them out (the prompt left-padded, the response after it, padding after its end). Used to
    train on stored reference samples (distillation): the exact token paths the reference drew, not the
    decoded text re-encoded, which may split into a path the reference rarely draws."""
    if tokens.dim() != 3 or tuple(lengths.shape) != tuple(tokens.shape[:2]) or tokens.shape[0] != len(prompts):
        raise ValueError(f"rollout_from_tokens needs tokens [P, k, T] and lengths [P, k] for P = {len(prompts)} "
                         f"prompts, got {tuple(tokens.shape)} and {tuple(lengths.shape)}")
    p, k, _ = tokens.shape
    width = max(1, int(lengths.max()))
    response_mask = (torch.arange(width) < lengths.reshape(-1, 1)).long()
    response = tokens.reshape(p * k, -1)[:, :width].long().masked_fill(response_mask == 0, tokenizer.pad_token_id)
    batch = tokenize_prompts(tokenizer, prompts)
    prompt_ids = batch["input_ids"].repeat_interleave(k, dim=0)
    prompt_mask = batch["attention_mask"].repeat_interleave(k, dim=0)
    return Rollout(input_ids=torch.cat([prompt_ids, response], dim=1),
                   attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                   response_mask=response_mask, prompt_len=prompt_ids.shape[1])
