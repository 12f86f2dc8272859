"""Rollout generation: the project's sampler against `transformers`' `generate` on the same model and prompts.

    python bench/sampler_speed.py                    # the default reference policy (built if missing)
    python bench/sampler_speed.py --prompts 8 --k 16 # a calibration-cache batch (8 prompts x M = 16)
    python bench/sampler_speed.py --policy outputs/train/<run>/policy   # a trained policy (shorter answers)

Variants, taking turns within every repeat (so load from other processes hits them alike), each on the same
prompts and seed, recording the sampled log-probs as a training rollout does:
- `generate`: `model.generate(do_sample=True, num_return_sequences=k)` as a user would call it (no recorder,
  the prompt run k times): the plain batched `generate` of the same model;
- `ours`: the project's sampler, `infalign.models.sampling.generate` (inverse-CDF draws, log-probs recorded).
(The `generate+shared` and `ours/multinomial` rows of docs/benchmarks.md, section 6, are of the removed
`generation.cache_implementation` and `generation.sampler=multinomial`.)
Prints median seconds and new (real, EOS included) tokens per second. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py config overrides (e.g. scale=smoke)")
    ap.add_argument("--policy", help="a save_pretrained policy directory (default: the config's reference)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import generate
    from infalign.runtime.paths import conf_dir, register_resolvers
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *args.overrides])
    partitions = load_partitions(cfg.data)
    model, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    if args.policy:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    prompts = [p[1] for p in _prompt_sets(cfg, partitions, tokenizer)[0][: args.prompts]]
    gen = sampling_kwargs(cfg.generation)
    max_new = int(gen["max_new_tokens"])

    def plain():
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=max_new, num_return_sequences=args.k,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        response = out[:, batch["input_ids"].shape[1]:]
        is_eos = response == tokenizer.eos_token_id
        return int(((is_eos.cumsum(-1) - is_eos.long()) == 0).sum())

    def ours():
        return int(generate(model, tokenizer, prompts, args.k, gen, record_logprobs=True).lengths.sum())

    variants = {"generate": plain, "ours": ours}
    load_before = os.getloadavg()
    times = {name: [] for name in variants}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # round 0 warms up
            for name, fn in variants.items():
                torch.manual_seed(rep)
                t0 = time.perf_counter()
                tokens = fn()
                if rep:
                    times[name].append((time.perf_counter() - t0, tokens))
    load_after = os.getloadavg()
    print(f"\n### `python bench/sampler_speed.py {' '.join(args.overrides)}` ({args.prompts} prompts x k = {args.k}, "
          f"up to {max_new} new tokens{', policy ' + args.policy if args.policy else ''})\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print("| variant | median s | new tokens / s (median) | vs generate |\n| --- | --- | --- | --- |")
    base = statistics.median(t for t, _ in times["generate"])
    for name, runs in times.items():
        med = statistics.median(t for t, _ in runs)
        print(f"| {name} | {med:.3f} | {statistics.median(n / t for t, n in runs):.0f} | {base / med:.2f}x faster |")


if __name__ == "__main__":
    main()
