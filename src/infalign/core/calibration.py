"""Reward calibration (math page, section 2, step 1).

The calibrated reward of a policy response is its win probability against the reference policy on the
same prompt, estimated from M reference samples:

    C(x, y) = (#{j : r_j < r(x, y)} + 0.5 * #{j : r_j == r(x, y)}) / M

Under the reference policy C is Uniform(0, 1) for every prompt, whatever the reward model's scale, and an
increasing map of the rewards leaves C unchanged. Pure torch: no Lightning here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

__all__ = ["Calibrator", "EmpiricalCalibrator", "PassThroughCalibrator", "check_rewards", "leave_one_out_calibrated"]


def check_rewards(policy_rewards, reference_rewards) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a `[P, K]` / `[P, M]` pair of reward tables and return them as float64 tensors.

    Raises `ValueError` naming what is wrong (shape, empty reference set, NaN/inf) before any work.
    """
    a = torch.as_tensor(policy_rewards)
    b = torch.as_tensor(reference_rewards)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"rewards must be 2-D tables [prompts, samples]: got policy_rewards of shape {tuple(a.shape)} "
            f"and reference_rewards of shape {tuple(b.shape)}; add a leading prompt axis for one prompt"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"policy_rewards has {a.shape[0]} prompts but reference_rewards has {b.shape[0]}: both must "
            "hold the same prompts in the same order"
        )
    if b.shape[1] == 0:
        raise ValueError("reference_rewards has no samples (M = 0): calibration needs M >= 1 reference samples")
    if a.shape[1] == 0:
        raise ValueError("policy_rewards has no samples (K = 0)")
    for name, t in (("policy_rewards", a), ("reference_rewards", b)):
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bad.any():
            p, s = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), first at prompt {p}, "
                f"sample {s}: fix the reward model or drop those samples before calibrating"
            )
    return a.to(torch.float64), b.to(torch.float64)


class Calibrator(ABC):
    """Maps raw rewards of policy samples to the reward the transform sees.

    `needs_reference` says whether the calibrator reads the reference rewards (the trainer skips
    building the calibration cache when no component needs it).
    """

    needs_reference: bool = True

    @abstractmethod
    def __call__(self, policy_rewards: torch.Tensor, reference_rewards: torch.Tensor) -> torch.Tensor:
        """`policy_rewards [P, K]`, `reference_rewards [P, M]` -> calibrated rewards `[P, K]`."""


def leave_one_out_calibrated(rewards: torch.Tensor) -> torch.Tensor:
    """The calibrated reward of each of a prompt's M reference samples against the other M - 1 (the sample
    itself left out, ties counting half): `[P, M] -> [P, M]`, values in multiples of 1/(2(M - 1)). Under the
    reference each is, like C, uniform on its grid; used by distillation, which trains on these samples."""
    r = torch.as_tensor(rewards)
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"leave-one-out calibration needs [P, M] rewards with M >= 2, got shape {tuple(r.shape)}")
    below = (r.unsqueeze(2) > r.unsqueeze(1)).sum(2)  # [p, i]: #{j : r_j < r_i}
    ties = (r.unsqueeze(2) == r.unsqueeze(1)).sum(2) - 1  # j == i always ties with itself: left out
    return (below + 0.5 * ties).to(torch.float64) / (r.shape[1] - 1)


class EmpiricalCalibrator(Calibrator):
    """`C = (#{ref < r} + 0.5 #{ref == r}) / M`, vectorised over prompts with one sort and two searches."""

    def __call__(self, policy_rewards, reference_rewards) -> torch.Tensor:
        as_numpy = isinstance(policy_rewards, np.ndarray)
        dtype = torch.as_tensor(policy_rewards).dtype
        a, b = check_rewards(policy_rewards, reference_rewards)
        ref_sorted = b.sort(dim=1).values.contiguous()
        a = a.contiguous()
        below = torch.searchsorted(ref_sorted, a, right=False)  # #{ref < r}
        at_or_below = torch.searchsorted(ref_sorted, a, right=True)  # #{ref <= r}
        # (lt + le) / 2M == (lt + 0.5 * eq) / M: ties count half.
        calibrated = (below + at_or_below).to(torch.float64) / (2.0 * b.shape[1])
        if as_numpy:
            return calibrated.numpy()
        return calibrated.to(dtype if dtype.is_floating_point else torch.float32)

    def __repr__(self) -> str:
        return "EmpiricalCalibrator()"


class PassThroughCalibrator(Calibrator):
    """No calibration: the transform sees the raw reward (the classic RLHF `raw` baseline)."""

    needs_reference = False

    def __call__(self, policy_rewards, reference_rewards=None) -> torch.Tensor:
        if reference_rewards is None:
            reference_rewards = torch.zeros(torch.as_tensor(policy_rewards).shape[0], 1)
        check_rewards(policy_rewards, reference_rewards)
        return policy_rewards

    def __repr__(self) -> str:
        return "PassThroughCalibrator()"
