"""Benchmark: k-fold cross-validated pairwise accuracy of Bradley-Terry heads on frozen features.

    python bench/compare_reward_heads.py --backbone minilm
    python bench/compare_reward_heads.py --backbone policy_frozen --policy-path .cache/policy/<hash>

The held-out test partition has only ~230 pairs (95% interval about +-0.065), too few to rank backbones or
heads; k-fold cross-validation over all ~2.3k pairs gives about +-0.02. Frozen features are computed once
(the slow part: minutes for MiniLM on 2 cores), then linear and MLP heads are trained per fold.
Folds are cut by prompt, as the partitions are.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def fold_of(prompt_id: str, k: int) -> int:
    return int(hashlib.sha256(f"cv:{prompt_id}".encode()).hexdigest(), 16) % k


def cv_curve(chosen, rejected, folds, hidden: int, epochs: int, lr=1e-3, wd=0.01, k=5):
    """Mean held-out accuracy after each epoch, over k folds."""
    from infalign.models.reward_embedding import make_head

    curves = []
    for f in range(k):
        tr, te = (folds != f).nonzero().squeeze(1), (folds == f).nonzero().squeeze(1)
        torch.manual_seed(0)
        head = make_head(chosen.shape[1], hidden, 0.1)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
        accs = []
        for _ in range(epochs):
            head.train()
            for idx in tr[torch.randperm(len(tr))].split(64):
                loss = -nn.functional.logsigmoid(head(chosen[idx]) - head(rejected[idx])).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                accs.append(float((head(chosen[te]) > head(rejected[te])).float().mean()))
        curves.append(accs)
    return torch.tensor(curves)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm", choices=["minilm", "policy_frozen", "smollm2"])
    ap.add_argument("--policy-path", help="reference policy folder, for policy_frozen")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--features", help="a .pt file: loaded if it exists, else the features are saved there")
    args = ap.parse_args()

    from infalign.models.bradley_terry import encode_pairs
    from infalign.models.data import load_partitions
    from infalign.models.reward import DEFAULT_BATCH_TOKENS
    from infalign.models.reward_embedding import load_frozen_encoder

    cfg = {"root": args.data_root} if args.data_root else {}
    parts = load_partitions(cfg)
    records = parts["train"] + parts["validation"] + parts["test"]
    t = time.time()
    if args.features and os.path.exists(args.features):
        chosen, rejected = torch.load(args.features, weights_only=True)  # tensors only: never run pickled code
    else:
        enc = load_frozen_encoder(args.backbone, 192, 64, policy_path=args.policy_path)
        chosen, rejected = encode_pairs(enc, records, DEFAULT_BATCH_TOKENS, True, f"{args.backbone} features")
        if args.features:
            torch.save((chosen, rejected), args.features)
    feat_s = time.time() - t
    torch.set_num_threads(1)  # tiny heads: extra threads only add contention
    folds = torch.tensor([fold_of(r.prompt_id, args.folds) for r in records])
    half = chosen.shape[1] // 2
    out = {"backbone": args.backbone, "pairs": len(records), "feature_seconds": round(feat_s, 1), "results": []}
    for feats, (c, r) in {"context+response": (chosen, rejected), "context": (chosen[:, :half], rejected[:, :half]),
                          "response": (chosen[:, half:], rejected[:, half:])}.items():
        for hidden in (0, 256):
            curve = cv_curve(c, r, folds, hidden, args.epochs, k=args.folds)
            mean, best = curve.mean(0), int(curve.mean(0).argmax())
            row = {"features": feats, "head": "linear" if hidden == 0 else f"mlp{hidden}",
                   "cv_acc_last": round(float(mean[-1]), 3), "cv_acc_best": round(float(mean[best]), 3),
                   "best_epoch": best + 1, "fold_sd_last": round(float(curve[:, -1].std()), 3)}
            out["results"].append(row)
            print(row, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
