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
    "token_kl",
    "kl_to_go",
    "exact_kl_advantages",
    "distillation_weights",
    "GradientNoiseScale",
    "AdaptiveKLController",
]

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
    """REINFORCE with the leave-one-out baseline: mean over sequences of `-sum_t A_it log pi(y_t)`, where the
    advantage is per sequence (`[S]`, the same for every token) or per token (`[S, T]`)."""
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    return -(adv * logp * mask.to(logp.dtype)).sum(-1).mean()


def token_kl(logp_all: torch.Tensor, ref_logp_all: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact KL(pi || pi_ref) of each position's next-token distributions, summed over the whole
    vocabulary: `[S, T, V]` log-softmaxes -> `[S, T]` (0 where masked). Differentiable in `logp_all`: its
    gradient is the pathwise part of the KL's gradient at the visited states."""
    kl = (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    return kl * mask.to(kl.dtype)


def kl_to_go(kl: torch.Tensor) -> torch.Tensor:
    """`G_t = sum_{t' > t} kl_t'`: the KL a token's choice still leads to (`[S, T]` -> `[S, T]`)."""
    return kl.flip(-1).cumsum(-1).flip(-1) - kl


def exact_kl_advantages(phi: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token advantages for `kl_penalty=exact` (math page, section 5, with the KL's gradient split in two):

    grad [E Phi - beta KL] = E sum_t grad log pi(y_t) (Phi - beta G_t - b) - beta E sum_t grad KL_t,
    with `G_t` the exact KL still to come after token t (`kl_to_go`) and `KL_t` the exact per-position KL,
    whose own gradient (the pathwise part, at the visited states) is in the loss (`token_kl`). The
    baseline `b` of a sample is the leave-one-out mean of `Phi_j - beta sum_t KL_t(j)` over its prompt's
    other samples: independent of its tokens, so unbiased.
    `phi`: `[P, k]` transformed rewards, `kl`: `[P * k, T]` per-position exact KL at sampling time (detached).
    Returns `[P * k, T]`."""
    p, k = phi.shape
    total = phi.flatten() - beta * kl.sum(-1)
    baseline = (total.view(p, k) - rloo_advantages(total.view(p, k))).flatten()
    return (phi.flatten() - baseline).unsqueeze(-1) - beta * kl_to_go(kl)


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
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # per sequence [S] or per token [S, T]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped) * m
    clip_fraction = (((ratio - 1.0).abs() > clip).to(m.dtype) * m).sum() / m.sum().clamp_min(1.0)
    return per_token.sum(-1).mean(), clip_fraction.detach()


def distillation_weights(transformed: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised weights of the optimal tilt on a prompt's reference samples, `w_i ∝ exp(Phi_i / beta)`
    (`[P, M]` -> `[P, M]`, rows summing to 1, computed in log space so no Phi/beta overflows), and each
    prompt's effective sample size `1 / sum_i w_i^2` (`[P]`: M for equal weights, 1 when one sample holds
    all the weight)."""
    weights = torch.softmax(transformed.double() / beta, dim=-1)
    return weights, 1.0 / weights.pow(2).sum(-1)


class GradientNoiseScale:
    """The simple gradient noise scale `B_simple = tr(Sigma) / |G|^2` (McCandlish et al. 2018, appendix A),
    from the norms of the minibatch gradients (`b` sequences each) and of their mean (`B` sequences):

        |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b),   tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B).

    Both are unbiased per iteration but noisy, so numerator and denominator are averaged over iterations
    (exponential moving average, `decay`) before the ratio, as the paper recommends. The minibatch gradients
    of one iteration are taken at successive parameters (one optimizer step apart): an approximation that
    holds while a step changes the gradient little. `B_simple` far above the sequences per step says the
    steps are mostly noise."""

    def __init__(self, decay: float = 0.9):
        self.decay, self.g2, self.trace = float(decay), None, None

    def update(self, small_sq: float, big_sq: float, b: int, big: int) -> dict[str, float]:
        g2 = (big * big_sq - b * small_sq) / (big - b)
        trace = (small_sq - big_sq) / (1.0 / b - 1.0 / big)
        if self.g2 is None:
            self.g2, self.trace = g2, trace
        else:
            self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
            self.trace = self.decay * self.trace + (1 - self.decay) * trace
        out = {"grad/true_norm_sq": self.g2, "grad/noise_trace": self.trace}
        if (scale := self.scale) is not None:  # undefined: no value, not a sentinel that wrecks every plot of it
            out["grad/noise_scale"] = scale
        return out

    @property
    def scale(self) -> float | None:
        """`tr(Sigma) / |G|^2`; None before the first update, or while the |G|^2 estimate is <= 0 (the signal is
        below the noise: the scale is undefined, not large and negative)."""
        return self.trace / self.g2 if self.g2 is not None and self.g2 > 0 else None

    def state_dict(self) -> dict:
        return {"g2": self.g2, "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        self.g2, self.trace = state.get("g2"), state.get("trace")


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
