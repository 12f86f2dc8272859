"""Benchmark: build the default tokenizer + reference policy + reward model from scratch and report.

    python bench/build_default.py                      # the default config, into a fresh cache dir
    python bench/build_default.py model.gpt2.n_layer=2 reward.backbone=policy   # any build.yaml override
    python bench/build_default.py --cache .cache       # reuse a cache (measures load time instead)

Prints and writes (outputs/bench/build_<time>.json) the wall time per stage, the reference's validation
perplexity (per token and in bits per character, comparable across vocabularies), the reward model's
held-out pairwise accuracy with a 95% interval, and sampled reference responses to test prompts.
Not a test: it trains for minutes. Run it on an otherwise idle machine for meaningful timings.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def bits_per_char(ppl: float, tok, records, max_p: int, max_r: int) -> float:
    """Convert per-token validation perplexity to bits per character of the same (truncated) text."""
    from infalign.models.sft import encode_dialogue

    n_tok = n_chr = 0
    for r in records:
        ids, _ = encode_dialogue(r.prompt, r.chosen, tok, max_p, max_r)
        n_tok += len(ids) - 1  # the metric scores every token but the first
        n_chr += len(tok.decode(ids, skip_special_tokens=True))
    return math.log2(ppl) * n_tok / n_chr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/build.yaml")
    ap.add_argument("--cache", help="cache root (default: a fresh temporary directory = build from scratch)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from hydra import compose, initialize_config_dir

    from infalign.models.build import build_all
    from infalign.models.data import load_partitions
    from infalign.runtime.paths import conf_dir

    cache = args.cache or tempfile.mkdtemp(prefix="infalign-bench-")
    overrides = [f"cache_root={cache}", f"samples={args.samples}", *args.overrides]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="build", overrides=overrides)
    t0 = time.time()
    summary = build_all(cfg, progress=sys.stderr.isatty())
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary.update(overrides=overrides, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())

    pol = summary["stages"].get("policy", {}).get("meta", {})
    if "val/ppl" in pol:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(summary["stages"]["policy"]["path"])
        parts = load_partitions(cfg.data)
        pol["val_bits_per_char"] = bits_per_char(pol["val/ppl"], tok, parts["validation"],
                                                 cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    rew = summary["stages"].get("reward", {}).get("meta", {})
    if "test_acc" in rew:
        half = 1.96 * math.sqrt(rew["test_acc"] * (1 - rew["test_acc"]) / rew["n_test"])
        rew["test_acc_95ci"] = [rew["test_acc"] - half, rew["test_acc"] + half]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"build_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({"wall_seconds": summary["wall_seconds"],
                      "stage_seconds": {k: v["seconds"] for k, v in summary["stages"].items()},
                      "policy": {k: v for k, v in pol.items() if k != "history"},
                      "reward": rew, "overrides": args.overrides}, indent=1, default=str))
    for s in summary.get("samples", []):
        print(f"--- ...{s['prompt'][-160:]!r}\n    -> {s['response']!r}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
