"""Every random stream of a run, derived from the run's seed in one place.

A run draws randomness in several independent streams: which training prompts an iteration takes, the
samples of each training iteration (per process), the minibatch order of its update, the reference samples
of each calibration-cache batch, and the samples of each evaluation batch. Each stream's seed is a hash of
(run seed, stream name, indices), so no two streams, iterations, batches or processes share a seed (with
arithmetic such as `seed * 1_000_003 + 7 * i + 1` two streams could meet: iteration 0's rollout and
calibration batch 1 both used `torch.manual_seed(1)` at seed 0), and adding a stream moves no other.
"""

from __future__ import annotations

import hashlib

__all__ = ["STREAMS", "derive_seed"]

STREAMS = (
    "prompt_order",       # IterationSampler: the permutation of the training prompts for each pass over them
    "rollout",            # the policy's samples of each training iteration, per process
    "minibatch_order",    # the order of the update's minibatches in each iteration
    "calibration_cache",  # the reference samples of each calibration-cache batch
    "evaluation",         # the policy's samples of each evaluation batch
    "evaluation_held_in", # the policy's samples of each batch of the held-in evaluation (eval.held_in_prompts)
    "null_control",       # rl.null_control: the within-prompt shuffle of the transformed rewards, per iteration
    "distill_pool",       # the reference samples of the training prompts that distillation fits, per batch
    "distill",            # which pool samples a distillation iteration resamples, per iteration and process
    "frontier_fresh",     # bench/frontier.py: the fresh reference samples the frontier tilts, per batch
    "frontier_independent",  # bench/frontier.py: the independent reference side of its win rates, per batch
    "lora_init",          # the LoRA adapters' initial weights (model.lora.r > 0)
)


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for `stream` at `indices` (iteration, rank, batch, ...), independent of every other."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; the streams are {STREAMS}")
    key = "/".join(str(int(x)) for x in (seed, *indices))
    digest = hashlib.blake2b(f"infalign/{stream}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
