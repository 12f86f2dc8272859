"""Pure sampling: the `generate` settings under which samples come from the model's own distribution.

The KL estimate and the policy gradient assume responses drawn from the policy itself. `sampling_kwargs`
turns `cfg.generation` (checked by `infalign.config`: nothing that changes the sampling distribution) into
`generate` kwargs; `check_sampler_kwargs` refuses any other kwargs the project's sampler would ignore;
`generate_kwargs` adds every probability-changing `GenerationConfig` field at its neutral
value, so the checkpoint's own `generation_config` cannot slip one in; `check_pure_sampling` refuses to
sample if `model.generate` would still build a logits processor. Used by `infalign.models.sampling`.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from transformers import GenerationConfig, LogitsProcessorList

__all__ = ["PURE_SAMPLING", "check_pure_sampling", "check_sampler_kwargs", "generate_kwargs", "sampling_kwargs"]


# Every `GenerationConfig` field (transformers 5.24) that changes the probabilities tokens are drawn from, the
# decoding strategy, or what is sampled, at the value that switches it off. `generate` passes all of them (the
# fields this transformers version has), so nothing of the checkpoint's own `generation_config` gets through:
# a field `generate` is not given is filled from `model.generation_config`, even under a `generation_config`
# passed explicitly, so they are passed as kwargs, which take precedence over both.
PURE_SAMPLING = {
    # decoding strategy: ancestral sampling (no beams, contrastive / DoLa / assisted / constrained decoding)
    "do_sample": True, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "dola_layers": None,
    "constraints": None, "force_words_ids": None, "use_mtp": False, "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None, "speculation_type": None,
    # logits processors (run before `_SampledLogProbs`: they would change the recorded log-probs too)
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "guidance_scale": None,
    # warpers (run after it: the recorded log-probs would still match a fresh pass, a bias no check sees)
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    # after all of them
    "watermarking_config": None, "renormalize_logits": False,
    # what is sampled and where it stops, besides max_new_tokens and EOS (the response mask knows only EOS)
    "token_healing": False, "stop_strings": None, "max_time": None,
}


def _is_neutral(value, neutral) -> bool:
    if neutral is True:  # do_sample: unset means greedy in `generate`
        return value is True
    return value is None or (type(value) in (bool, int, float) and value == neutral)


def sampling_kwargs(gen_cfg) -> dict:
    """`generate` kwargs from `cfg.generation`, whose values the config check (`infalign.config`, before torch)
    has refused unless they sample from the policy itself: temperature 1, no top-k / top-p, a known sampler, no
    other key. There is no separate generation config for evaluation: the calibration samples and the win-rate
    evaluation sample exactly like training. Any other key of `gen_cfg` is passed on, so `rollout.generate`
    refuses one that would change the probabilities instead of it being dropped.
    """
    from omegaconf import OmegaConf

    gen = OmegaConf.to_container(gen_cfg, resolve=True) if OmegaConf.is_config(gen_cfg) else dict(gen_cfg)
    kwargs = {"sampler": str(gen.pop("sampler", None) or "inverse_cdf"), "do_sample": True,
              "temperature": float(gen.pop("temperature", 1.0)), "top_k": int(gen.pop("top_k", None) or 0),
              "top_p": float(gen.pop("top_p", None) or 1.0), "max_new_tokens": int(gen.pop("max_new_tokens", 48))}
    # e.g. cache_implementation: a preallocated ("static") KV cache was 1.65x faster for one batch of 256 sequences
    # here, but much slower across RL iterations (new shapes each call); off by default. It changes no probabilities.
    return {**kwargs, **{k: v for k, v in gen.items() if v is not None}}


@functools.cache
def _config_fields() -> frozenset[str]:
    return frozenset(vars(GenerationConfig()))


def generate_kwargs(tokenizer, gen_kwargs: dict) -> dict:
    """Everything `model.generate` is given besides the inputs: `gen_kwargs` over `PURE_SAMPLING`."""
    fields = _config_fields()
    kwargs = {name: value for name, value in PURE_SAMPLING.items() if name in fields}
    # the checkpoint's own KV-cache choice would clash with the shared prompt cache; ours comes in gen_kwargs
    kwargs["cache_implementation"] = None
    kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    kwargs.update({k: v for k, v in gen_kwargs.items() if k != "sampler"})  # generate draws as multinomial does
    return kwargs


def _refuse(what: str, hint: str):
    raise ValueError(
        f"rollout.generate samples from the model's own distribution (training rollouts, the calibration "
        f"samples and evaluation: the KL and the policy gradient need pure samples), but {what}. {hint}"
    )


def check_sampler_kwargs(gen_kwargs: dict) -> None:
    """Raise unless `gen_kwargs` ask for pure samples: the project's own sampler (`sampling._sample`) reads
    only `max_new_tokens` and applies no setting, so any other one must be neutral, never silently dropped.
    (It never reads the checkpoint's `generation_config` either.)"""
    for name, value in gen_kwargs.items():
        if name in ("max_new_tokens", "cache_implementation", "sampler"):
            continue
        if name not in PURE_SAMPLING:
            _refuse(f"the generation setting {name}={value!r} is not one it knows", f"Remove {name}.")
        if not _is_neutral(value, PURE_SAMPLING[name]):
            _refuse(f"{name}={value!r} (from the generation kwargs) would change the sampling distribution",
                    f"Remove {name} or set it to {PURE_SAMPLING[name]!r}.")


def check_pure_sampling(model, kwargs: dict, gen_kwargs: dict, batch: dict[str, torch.Tensor]) -> None:
    """Raise if `model.generate(**kwargs)` would not draw from the model's own distribution.

    Checks the config `generate` ends up with (the model's `generation_config` merged with `kwargs`, as
    `generate` merges them): the known fields, the decoding mode, and the logits processors it would build
    (the defence against fields `PURE_SAMPLING` does not know, e.g. of a later transformers version).
    """
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is not None:
        effective = prepare(None, **kwargs)[0]
    else:
        effective = copy.deepcopy(model.generation_config)
        effective.update(**kwargs)

    fail = _refuse
    for name, neutral in PURE_SAMPLING.items():
        value = getattr(effective, name, None)
        if not _is_neutral(value, neutral):
            source = "the generation kwargs" if name in gen_kwargs else "the model's generation_config"
            fail(f"{name}={value!r} (from {source}) would change the sampling distribution",
                 f"Remove {name} or set it to {neutral!r}.")
    mode = str(getattr(effective.get_generation_mode(), "value", effective.get_generation_mode()))
    if mode != "sample":
        fail(f"the effective generation config decodes with {mode!r}, not plain sampling",
             "Remove the setting that selects it (from the model's generation_config or the generation kwargs).")
    build = getattr(model, "_get_logits_processor", None)
    if build is None:
        return
    length = batch["input_ids"].shape[1]
    device = batch["input_ids"].device
    if effective.max_new_tokens is not None:  # as `generate` turns the relative lengths into absolute ones
        effective.max_length = effective.max_new_tokens + length
    if getattr(effective, "min_new_tokens", None) is not None:
        effective.min_length = effective.min_new_tokens + length
    try:
        model._prepare_special_tokens(effective, True, device=device)
        processors = build(generation_config=effective, input_ids_seq_length=length,
                           encoder_input_ids=batch["input_ids"], prefix_allowed_tokens_fn=None,
                           logits_processor=LogitsProcessorList(), device=device,
                           model_kwargs={"attention_mask": batch["attention_mask"]})
    except (AttributeError, TypeError) as err:  # another transformers version's private API
        warnings.warn(f"could not list the logits processors generate builds ({err!r}); checked the known "
                      "generation settings only", stacklevel=3)
        return
    if len(processors):
        names = ", ".join(type(p).__name__ for p in processors)
        fail(f"model.generate would still apply {names} (set by the model's generation_config or the kwargs)",
             "Add the generation_config field that switches it off to infalign.models.sampling.PURE_SAMPLING.")
