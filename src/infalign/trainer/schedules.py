"""The learning-rate schedule of the `scheduler` partial (conf/train.yaml): called with the optimizer and the run's
total optimizer steps, it returns a torch scheduler the module hands to Lightning (checkpointed and resumed).

Why a warm-up matters here: Adam's first steps move every parameter by about the learning rate whatever the
gradient's signal-to-noise ratio, and a policy-gradient gradient is mostly noise (logged as `grad/noise_scale`).
"""

from __future__ import annotations

import torch

from infalign.models.sft import warmup_cosine_factor

__all__ = ["warmup_cosine"]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                  final_lr_fraction: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then a cosine from the optimizer's lr down to
    `final_lr_fraction` x lr at `total_steps`. The defaults (0, 1.0) are a constant learning rate."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not (isinstance(final_lr_fraction, (int, float)) and 0.0 <= final_lr_fraction <= 1.0):
        raise ValueError(f"scheduler.final_lr_fraction must be in [0, 1], got {final_lr_fraction!r}")
    total_steps = max(int(total_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, final_lr_fraction))
