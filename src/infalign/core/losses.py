"""The KL-regularised policy-gradient step (math page, section 5): KL estimates, RLOO advantages, losses.

Pure torch, no Lightning: the LightningModule calls these on rollout tensors. Shapes: `[S, T]` token
tables (S sequences, T response positions) with a 0/1 `mask` of real response tokens; sequence tables
`[P, k]` (P prompts, k samples each), flattened prompt-major.
"""

from __future__ import annotations

import torch

__all__ = [
    "sequence_kl",
    "rloo_advantages",
    "rloo_loss",
    "ppo_clip_loss",
    "AdaptiveKLController",
    "KL_PENALTY_MODES",
]

KL_PENALTY_MODES = ("reward", "loss")


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence KL(pi || pi_ref) estimates for samples drawn from pi.

    k1 = sum_t (log pi - log pi_ref) is unbiased (can be negative on one sample); k3 = sum_t
    ((r - 1) - log r) with r = pi_ref/pi is unbiased per token, non-negative and lower-variance.
    """
    mask = mask.to(logp.dtype)
    log_ratio = (logp - ref_logp) * mask
    ref_over_pi = -log_ratio
    k3 = (torch.expm1(ref_over_pi) - ref_over_pi) * mask
    return {"k1": log_ratio.sum(-1), "k3": k3.sum(-1)}


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages `A_i = R_i - mean_{j != i} R_j` per prompt: `[P, k] -> [P, k]`."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"RLOO needs k >= 2 samples per prompt for its leave-one-out baseline, got rewards of shape "
            f"{tuple(rewards.shape)}; set rl.k to 2 or more"
        )
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def rloo_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the leave-one-out baseline: mean over sequences of `-A_i * sum_t log pi(y_t)`."""
    seq_logp = (logp * mask.to(logp.dtype)).sum(-1)
    return -(advantages.detach() * seq_logp).mean()


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip on sequence-level advantages, summed over tokens like `rloo_loss` (the two have the same
    gradient on the first pass, where the ratio is 1). Returns (loss, fraction of clipped tokens)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp((logp - old_logp.detach()) * m)
    adv = advantages.detach().unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped) * m
    clip_fraction = (((ratio - 1.0).abs() > clip).to(m.dtype) * m).sum() / m.sum().clamp_min(1.0)
    return per_token.sum(-1).mean(), clip_fraction.detach()


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019):
    `beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n_steps / horizon)`."""

    def __init__(self, beta: float, target: float, horizon: int = 10_000):
        if target <= 0:
            raise ValueError(f"rl.target_kl must be positive (nats per sequence), got {target}")
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        error = max(min((kl - self.target) / self.target, 0.2), -0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
