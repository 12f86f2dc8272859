"""bf16 mixed precision on this machine: how wrong are the log-probs and the KL, and how much faster is it?

    python bench/bf16_check.py                                   # the default tiny model (built if missing)
    python bench/bf16_check.py scale=smoke                       # any train.py overrides
    python bench/bf16_check.py --policy outputs/train/<run>/policy   # a trained policy instead of a perturbed one

For the same rollouts it computes, with autocast exactly as Lightning's `precision=bf16-mixed` applies it
(`MixedPrecision("bf16-mixed", device).forward_context()`), and in fp32:
- per-token and per-sequence log-probs of the policy and the reference, and the per-sequence k1 KL
  `sum_t log pi - log pi_ref` that enters the reward `Phi(C) - beta KL`;
- the rewards of the reward model (the calibration cache scores the reference in fp32);
and times generation (the rollout), the no-grad log-prob pass and one update (forward + backward) both ways.

Without --policy the policy is the reference with seeded Gaussian noise on every weight (`--noise` times
each tensor's std), so that it differs from the reference by a KL of the order a run reaches. Prints a
Markdown report for docs/benchmarks.md, section 2.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from infalign.core.losses import sequence_kl
from infalign.models.logprobs import response_logprobs
from infalign.models.pure_sampling import sampling_kwargs
from infalign.models.sampling import decode_responses, generate


def load(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.reward import load_reward_model
    from infalign.runtime.paths import conf_dir
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    reward = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions, progress=False)
    train_prompts, _ = _prompt_sets(cfg, partitions, tokenizer)
    return cfg, reference, tokenizer, reward, train_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py config overrides (e.g. scale=smoke)")
    ap.add_argument("--policy", help="a save_pretrained policy directory (default: the perturbed reference)")
    ap.add_argument("--noise", type=float, default=0.05, help="relative weight noise of the perturbed policy")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--minibatch", type=int, default=32, help="sequences per update")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared: 1 is steadier)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lightning.pytorch.plugins.precision import MixedPrecision

    device = "cpu"
    bf16 = MixedPrecision("bf16-mixed", device)  # what trainer.precision=bf16-mixed uses: torch.autocast(bf16)
    contexts = {"fp32": nullcontext, "bf16-mixed": bf16.forward_context}

    cfg, reference, tokenizer, reward, prompts = load(args.overrides)
    reference.eval().requires_grad_(False)
    if args.policy:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(args.policy).eval()
        what = f"policy {args.policy}"
    else:
        policy = copy.deepcopy(reference)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.std().nan_to_num(0.0) * args.noise)
        what = f"reference + {args.noise} x std Gaussian noise per weight tensor"
    n_params = sum(p.numel() for p in policy.parameters())
    gen_kwargs = sampling_kwargs(cfg.generation)
    texts = [p[1] for p in prompts[: args.prompts]]
    reward_texts = [p[2] for p in prompts[: args.prompts]]

    # --- speed: rollout generation, no-grad log-prob pass, update (same seed, same prompts). fp32 and bf16 take
    # turns within every repeat, so that load from other processes on a shared machine hits both alike.
    def rollout(ctx):
        torch.manual_seed(1234)
        with ctx():
            return generate(policy, tokenizer, texts, args.k, gen_kwargs)

    def logprobs(ctx, r):
        with torch.no_grad(), ctx():
            return response_logprobs(policy, r), response_logprobs(reference, r)

    def update(ctx, r):
        sub = type(r)(r.input_ids[: args.minibatch], r.attention_mask[: args.minibatch],
                      r.response_mask[: args.minibatch], r.prompt_len)
        policy.requires_grad_(True)
        policy.zero_grad(set_to_none=True)
        with ctx():
            loss = -(response_logprobs(policy, sub).sum(-1)).mean()
        loss.backward()  # outside autocast, as Lightning's manual_backward does
        policy.requires_grad_(False)

    def score(ctx, r):
        with torch.no_grad(), ctx():
            return reward.score([p for p in reward_texts for _ in range(args.k)], decode_responses(tokenizer, r))

    samples = {name: {"generate": [], "score": [], "logprobs": [], "update": []} for name in contexts}
    rollouts = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, ctx in contexts.items():
            for phase, fn in (("generate", lambda: rollout(ctx)), ("score", lambda: score(ctx, rollouts[name])),
                              ("logprobs", lambda: logprobs(ctx, rollouts[name])),
                              ("update", lambda: update(ctx, rollouts[name]))):
                t0 = time.perf_counter()
                out = fn()
                if rep:
                    samples[name][phase].append(time.perf_counter() - t0)
                if phase == "generate":
                    rollouts[name] = out
    timings = {name: {k: statistics.median(v) for k, v in phases.items()} for name, phases in samples.items()}

    # --- accuracy: the bf16-mixed rollout (what training samples), scored both ways -------------------------
    r = rollouts["bf16-mixed"]
    scores = {}
    for name, ctx in contexts.items():
        with torch.no_grad(), ctx():
            lp, lr = response_logprobs(policy, r), response_logprobs(reference, r)
            rw = reward.score([p for p in reward_texts for _ in range(args.k)], decode_responses(tokenizer, r))
        scores[name] = (lp, lr, sequence_kl(lp, lr, r.response_mask)["k1"].double(), rw.double())
    lp32, lr32, kl32, rw32 = scores["fp32"]
    lp16, lr16, kl16, rw16 = scores["bf16-mixed"]
    mask = r.response_mask.bool()
    tok_err = (lp16 - lp32)[mask].abs()
    seq_err = ((lp16 - lp32) * r.response_mask).sum(-1).abs()
    kl_err = (kl16 - kl32).abs()
    rw_err = (rw16 - rw32).abs()
    # how often bf16 reorders a sample against the reference rewards: the calibrated reward is a rank
    off = ~torch.eye(len(rw32), dtype=torch.bool)
    rank_flips = ((rw16[:, None] > rw32[None, :]) != (rw32[:, None] > rw32[None, :]))[off].double().mean()

    print(f"\n### `python bench/bf16_check.py {' '.join(sys.argv[1:])}`\n")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
          f"{args.threads} thread(s); model {cfg.model.get('name', '?')} ({n_params / 1e6:.2f}M parameters), {what}; "
          f"{args.prompts} prompts x k={args.k}, max {gen_kwargs['max_new_tokens']} new tokens, "
          f"median of {args.repeats} after a warm-up, fp32 and bf16 alternating\n")
    print("| phase | fp32 s | bf16-mixed s | speed-up |\n| --- | --- | --- | --- |")
    for key, label in (("generate", f"rollout generate ({args.prompts * args.k} sequences)"),
                       ("score", "reward model scores them (backbone "
                                 f"{cfg.reward.get('backbone', cfg.reward.get('name', '?'))})"),
                       ("logprobs", "log-prob pass, policy + reference (no grad)"),
                       ("update", f"update: forward + backward, {min(args.minibatch, r.input_ids.shape[0])} sequences")):
        a, b = timings["fp32"][key], timings["bf16-mixed"][key]
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    print(f"\nfp32 KL(policy || reference), k1 per sequence: mean {kl32.mean():.4f} nats "
          f"(response length {r.lengths.float().mean():.1f} tokens)\n")
    print("| bf16-mixed vs fp32, same rollouts | mean | max |\n| --- | --- | --- |")
    print(f"| per-token log-prob error, policy (nats) | {tok_err.mean():.2e} | {tok_err.max():.2e} |")
    print(f"| per-sequence log-prob error, policy (nats) | {seq_err.mean():.2e} | {seq_err.max():.2e} |")
    print(f"| per-sequence k1 KL error (nats) | {kl_err.mean():.2e} | {kl_err.max():.2e} |")
    print(f"| mean k1 KL bias, bf16 - fp32 (nats) | {(kl16 - kl32).mean():+.2e} | |")
    print(f"| reward error (reward units; reward std {rw32.std():.3f}) | {rw_err.mean():.2e} | {rw_err.max():.2e} |")
    print(f"| mean reward bias, bf16 - fp32 | {(rw16 - rw32).mean():+.2e} | |")
    print(f"| pairwise order flips, bf16 rewards vs fp32 ones | {rank_flips:.2e} | |")


if __name__ == "__main__":
    main()
