"""Is a reference sample's decoded text, re-encoded, the token path the reference drew? (why the distillation
pool stores token ids; docs/solver_sweep.md)

    python bench/retokenisation.py                      # 16 training prompts x 16 fresh reference samples
    python bench/retokenisation.py --prompts 32 --k 8   # any size; train.py overrides after --

Samples with the default reference (`infalign.models.sampling.generate`, the trainer's sampler), decodes the
responses as the reward model reads them, re-encodes the texts as the sampler lays responses out (EOS appended
when the response ended before `max_new_tokens`), and prints how many re-encoded paths equal the sampled ones
and the reference's log-likelihood of the re-encoded path minus that of the sampled path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from frontier import load, uptime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from infalign.models.data import load_partitions
    from infalign.models.logprobs import response_logprobs
    from infalign.models.policy import load_policy
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import decode_responses, generate, rollout_from_tokens
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    print("before:", uptime())
    cfg = load(args.overrides)
    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    train, _ = _prompt_sets(cfg, partitions, tokenizer)
    prompts = [p[1] for p in train[: args.prompts]]
    gen_kwargs = sampling_kwargs(cfg.generation)
    max_new = int(gen_kwargs["max_new_tokens"])
    torch.manual_seed(args.seed)
    sampled = generate(reference, tokenizer, prompts, args.k, gen_kwargs)

    encoded = tokenizer(decode_responses(tokenizer, sampled), add_special_tokens=False)["input_ids"]
    rows = [ids[:max_new] + ([tokenizer.eos_token_id] if len(ids) < max_new else []) for ids in encoded]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    reencoded = rollout_from_tokens(tokenizer, prompts, tokens.view(len(prompts), args.k, -1),
                                    lengths.view(len(prompts), args.k))
    same = sum(sampled.response_ids[i][sampled.response_mask[i].bool()].tolist() == rows[i] for i in range(len(rows)))
    with torch.no_grad():
        diff = response_logprobs(reference, reencoded).sum(-1) - response_logprobs(reference, sampled).sum(-1)
    print(f"{len(prompts)} prompts x {args.k} samples: re-encoded path == sampled path for {same}/{len(rows)} "
          f"({same / len(rows):.0%})")
    print(f"log pi_ref(re-encoded) - log pi_ref(sampled), nats: mean {diff.mean():.2f}, min {diff.min():.2f}, "
          f"max {diff.max():.2f}; mean length {sampled.lengths.float().mean():.1f} sampled, "
          f"{lengths.float().mean():.1f} re-encoded")
    print("after:", uptime())


if __name__ == "__main__":
    main()
