"""Reward scoring: time per call as the pairs are batched, and what bf16 changes (docs/benchmarks.md, section 6).

    python bench/reward_scoring.py                      # the default reward model (built if missing)
    python bench/reward_scoring.py scale=smoke          # any train.py overrides
    python bench/reward_scoring.py --threads 2 --repeats 7

Responses: the reference samples of the calibration cache for the config (built first if missing), so the
lengths are what the trainer scores. Two workloads:
- `rollout`: one RL iteration's scoring, 16 prompts x k = 4 (the first 4 cached responses of 16 prompts);
- `cache`: the calibration cache, every prompt x M.
Schemes, taking turns within every repeat (so load from other processes hits them alike; the `cache` workload,
about a minute a scheme, in one round after the first rollout round):
- `unsorted-32`: the scheme before issue 14, 32 pairs per forward in the order given, each padded to its
  longest row (`max_batch_tokens` set so large that each 32-pair chunk is one batch);
- `sorted-<T>`: all pairs of the call tokenised once and batched by length, at most T padded tokens a batch;
- `sorted-<T>-bf16`: the same under `reward.precision=bf16`.
Accuracy of bf16 against fp32 on the `cache` workload: the fraction of within-prompt comparisons (reference
sample i vs j of the same prompt, i < j) whose order flips, and the largest score difference over the spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

BUDGETS = (2048, 4096, 8192, 16384)
CACHE_SCHEMES = ("unsorted-32", "sorted-2048", "sorted-2048-bf16")  # the long workload: what the flips need


def load(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from infalign.runtime.paths import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *overrides])
    return cfg


def reference_samples(cfg):
    """(reward prompts, responses [P][M]) of the config's calibration cache, built if missing."""
    import functools

    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.reward import load_reward_model
    from infalign.trainer.calibration_cache import load_or_build_reference_samples
    from infalign.trainer.pieces import calibration_key
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    reward = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions, progress=False)
    train, held_out = _prompt_sets(cfg, partitions, tokenizer)
    everything = train + held_out
    gen_kwargs = sampling_kwargs(cfg.generation)
    build = functools.partial(
        load_or_build_reference_samples, cache_root=cfg.cache_root,
        key=calibration_key(cfg, partitions, [p[0] for p in everything], gen_kwargs),
        prompt_ids=[p[0] for p in everything], prompts=[p[1] for p in everything],
        reward_prompts=[p[2] for p in everything], reference=reference, tokenizer=tokenizer, reward_model=reward,
        m=int(cfg.calibration.m), gen_kwargs=gen_kwargs, seed=int(cfg.calibration.seed),
        prompts_per_batch=int(cfg.calibration.prompts_per_batch), progress=False)
    samples = build()
    return reward, [p[2] for p in everything], samples.responses


def flips(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of within-row pairs (i < j) ordered differently by `a` and `b` (`[P, M]` each); a tie on one
    side and not the other counts as half a flip."""
    da = torch.sign(a.unsqueeze(-1) - a.unsqueeze(-2))
    db = torch.sign(b.unsqueeze(-1) - b.unsqueeze(-2))
    m = a.shape[1]
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    return float(((da - db).abs() / 2)[:, upper].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py config overrides (e.g. scale=smoke)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load(args.overrides)
    reward, reward_prompts, responses = reference_samples(cfg)
    m = len(responses[0])
    workloads = {
        "rollout": ([p for p in reward_prompts[:16] for _ in range(4)], [r for rs in responses[:16] for r in rs[:4]]),
        "cache": ([p for p in reward_prompts for _ in range(m)], [r for rs in responses for r in rs]),
    }
    schemes = {"unsorted-32": ("fp32", 10**9, 32)}
    schemes.update({f"sorted-{t}": ("fp32", t, None) for t in BUDGETS})
    schemes["sorted-2048-bf16"] = ("bf16", 2048, None)

    def run(name: str, prompts, texts) -> torch.Tensor:
        precision, budget, chunk = schemes[name]
        reward.configure(precision=precision, max_batch_tokens=budget)
        step = chunk or len(prompts)
        return torch.cat([reward.score(prompts[i: i + step], texts[i: i + step]) for i in range(0, len(prompts), step)])

    load_before = os.getloadavg()
    times = {w: {s: [] for s in schemes} for w in workloads}
    scores = {}
    for rep in range(args.repeats + 1):  # round 0 warms up
        for w, (prompts, texts) in workloads.items():
            if w == "cache" and rep != 1:  # the cache workload is long (about a minute a scheme): one round
                continue
            for s in schemes:
                if w == "cache" and s not in CACHE_SCHEMES:
                    continue
                t0 = time.perf_counter()
                scores[w, s] = run(s, prompts, texts)
                if rep:
                    times[w][s].append(time.perf_counter() - t0)
    load_after = os.getloadavg()

    print(f"\n### `python bench/reward_scoring.py {' '.join(args.overrides)}`\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{len(reward_prompts)} prompts x M = {m}\n")
    print("| scheme | rollout (64 pairs): median s | vs unsorted-32 | cache (all pairs): median s | vs unsorted-32 |")
    print("| --- | --- | --- | --- | --- |")
    r0, c0 = statistics.median(times["rollout"]["unsorted-32"]), statistics.median(times["cache"]["unsorted-32"])
    for s in schemes:
        r = statistics.median(times["rollout"][s])
        c = f"{statistics.median(times['cache'][s]):.2f} | {statistics.median(times['cache'][s]) / c0:.2f}x" \
            if times["cache"][s] else "- | -"
        print(f"| {s} | {r:.3f} | {r / r0:.2f}x | {c} |")
    fp32 = scores["cache", "sorted-2048"].view(len(reward_prompts), m).double()
    old = scores["cache", "unsorted-32"].view(len(reward_prompts), m).double()
    bf16 = scores["cache", "sorted-2048-bf16"].view(len(reward_prompts), m).double()
    spread = float(fp32.std())
    print(f"\nsorted-2048 vs unsorted-32 (fp32 both): comparison flips {flips(old, fp32):.5f}, "
          f"max |diff| {float((old - fp32).abs().max()):.2e} (reward std {spread:.3f})")
    print(f"bf16 vs fp32 (sorted-2048): comparison flips {flips(fp32, bf16):.5f} of "
          f"{len(reward_prompts) * m * (m - 1) // 2} within-prompt pairs, mean |diff| "
          f"{float((bf16 - fp32).abs().mean()):.2e}, max |diff| {float((bf16 - fp32).abs().max()):.2e}")


if __name__ == "__main__":
    main()
