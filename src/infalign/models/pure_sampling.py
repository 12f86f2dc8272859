"""Pure sampling: `cfg.generation` as the sampler's kwargs, and the check that they ask for pure samples only.

The KL estimate and the policy gradient assume responses drawn from the policy itself, so rollouts, the
calibration samples and evaluation sample at temperature 1 with no top-k / top-p, through the project's own
sampler (`infalign.models.sampling`), which applies no logits processor and never reads the checkpoint's own
`generation_config`. `sampling_kwargs` turns `cfg.generation` (checked by `infalign.config`) into its kwargs;
`check_sampler_kwargs` refuses any setting the sampler would otherwise ignore.
"""

from __future__ import annotations

__all__ = ["NEUTRAL", "check_sampler_kwargs", "sampling_kwargs"]

# What `sampling_kwargs` records besides max_new_tokens: the values the sampler draws with, the only ones allowed.
# `sampler` names how a token is drawn (inverse CDF, one uniform per token); the calibration cache's content
# address holds these kwargs, so entries drawn otherwise (by transformers' generate, before it was removed) stay apart.
NEUTRAL = {"sampler": ("inverse_cdf",), "do_sample": (True,), "temperature": (1.0,), "top_k": (0, None),
           "top_p": (1.0, None)}


def sampling_kwargs(gen_cfg) -> dict:
    """The sampler's kwargs from `cfg.generation`, whose values the config check (`infalign.config`, before torch)
    has refused unless they sample from the policy itself: temperature 1, no top-k / top-p, no other key. There is
    no separate generation config for evaluation: the calibration samples and the win-rate evaluation sample
    exactly like training. Any other key of `gen_cfg` is passed on, so `sampling.generate` refuses one that would
    change the probabilities instead of it being dropped.
    """
    from omegaconf import OmegaConf

    gen = OmegaConf.to_container(gen_cfg, resolve=True) if OmegaConf.is_config(gen_cfg) else dict(gen_cfg)
    gen.pop("cache_implementation", None)  # a run config saved before it was removed (a KV-cache layout: no probability)
    kwargs = {"sampler": str(gen.pop("sampler", None) or "inverse_cdf"), "do_sample": True,
              "temperature": float(gen.pop("temperature", 1.0)), "top_k": int(gen.pop("top_k", None) or 0),
              "top_p": float(gen.pop("top_p", None) or 1.0), "max_new_tokens": int(gen.pop("max_new_tokens", 48))}
    return {**kwargs, **{k: v for k, v in gen.items() if v is not None}}


def check_sampler_kwargs(gen_kwargs: dict) -> None:
    """Raise unless `gen_kwargs` ask for pure samples: the sampler (`sampling._sample`) reads only
    `max_new_tokens`, so every other key must be one of `NEUTRAL` at its value, never silently dropped."""
    for name, value in gen_kwargs.items():
        if name == "max_new_tokens":
            continue
        if name not in NEUTRAL:
            problem, hint = f"the generation setting {name}={value!r} is not one it knows", f"Remove {name}."
        elif not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in NEUTRAL[name]):
            problem = (f"{name}={value!r} would change the sampling distribution" if name != "sampler" else
                       f"sampler={value!r} is not how it draws a token (inverse_cdf, the only sampler left)")
            hint = f"Remove {name} or set it to {NEUTRAL[name][0]!r}."
        else:
            continue
        raise ValueError(f"sampling.generate samples from the model's own distribution (training rollouts, the "
                         f"calibration samples and evaluation: the KL and the policy gradient need pure samples), "
                         f"but {problem}. {hint}")
