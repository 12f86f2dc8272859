"""Training a reward model on preference pairs with the Bradley-Terry loss (for ``reward=trained``).

``P(chosen > rejected) = sigmoid(r(x, y_c) - r(x, y_r))``; the loss is its negative log (`BradleyTerryModule`,
fitted by `fit_bradley_terry` with model selection on validation accuracy). `train_frozen_head` trains a small head
on a frozen encoder's features, computed once for every pair (`encode_pairs`); `train_finetuned_policy` fine-tunes
the reference policy's GPT-2 end to end with a scalar head. `pairwise_accuracy` is the held-out measure.
`infalign.models.reward_train` builds and caches the result.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from infalign.models.data import PreferenceRecord
from infalign.models.reward import (
    DEFAULT_BATCH_TOKENS,
    RewardModel,
    SequenceClassifierReward,
)
from infalign.models.reward_embedding import load_frozen_encoder, make_head
from infalign.models.sft import BestValidationModule, fit


class BradleyTerryModule(BestValidationModule):
    """Trains ``score_fn(model, batch) -> rewards`` on (chosen, rejected) batches; keeps the weights of the best
    validation accuracy."""

    monitor, mode = "val/acc", "max"

    def __init__(self, model: nn.Module, score_fn, **optim):
        super().__init__(model, **optim)
        self.score_fn = score_fn
        self._val: list[torch.Tensor] = []

    def _margin(self, batch) -> torch.Tensor:
        chosen, rejected = batch
        return self.score_fn(self.model, chosen) - self.score_fn(self.model, rejected)

    def training_step(self, batch, batch_idx):
        margin = self._margin(batch)
        loss = -nn.functional.logsigmoid(margin).mean()
        self.log("train/bt_loss", loss, prog_bar=True, batch_size=len(margin))
        self.log("train/acc", (margin > 0).float().mean(), batch_size=len(margin))
        return loss

    def validation_step(self, batch, batch_idx):
        self._val.append(self._margin(batch).detach())

    def on_validation_epoch_end(self):
        margin = torch.cat(self._val)
        self._val.clear()
        # ties (margin == 0) count half: a constant scorer gets exactly chance
        acc = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        self.end_validation_epoch({"val/acc": acc, "val/bt_loss": float(-nn.functional.logsigmoid(margin).mean())})


def fit_bradley_terry(scorer: nn.Module, score_fn, train_dl: DataLoader, val_dl: DataLoader, train_cfg: Mapping,
                      seed: int, progress: bool) -> dict:
    module = fit(BradleyTerryModule, scorer, train_dl, val_dl, train_cfg, epochs=int(train_cfg.get("epochs", 20)),
                 seed=seed, progress=progress, score_fn=score_fn)
    return {"val_acc": module.best_metrics["val/acc"], "best_epoch": module.best_metrics["epoch"]}


def pairwise_accuracy(rm: RewardModel, records: list[PreferenceRecord]) -> float:
    """Fraction of pairs where the chosen response scores higher (ties count half)."""
    if not records:
        return float("nan")
    prompts = [r.prompt for r in records]
    margin = rm.score(prompts, [r.chosen for r in records]) - rm.score(prompts, [r.rejected for r in records])
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


# ------------------------------------------------------------------------------------- frozen + head
@torch.no_grad()
def encode_pairs(encoder, records: list[PreferenceRecord], max_batch_tokens: int, progress: bool, desc: str,
                 chunk: int = 512):
    """Frozen features of every (prompt, chosen) and (prompt, rejected) pair. A chunk's chosen and rejected
    rows go through the encoder together: its shared prompts are tokenised once, and all of its rows are
    batched by length. Chunks only pace the progress bar (sorting within 512 pairs pads nearly as little as
    sorting them all)."""
    feats_c, feats_r = [], []
    for i in tqdm(range(0, len(records), chunk), desc=desc, disable=not progress):
        part = records[i: i + chunk]
        prompts = [r.prompt for r in part]
        feats = encoder(prompts + prompts, [r.chosen for r in part] + [r.rejected for r in part], max_batch_tokens)
        feats_c.append(feats[: len(part)])
        feats_r.append(feats[len(part):])
    return torch.cat(feats_c), torch.cat(feats_r)


def train_frozen_head(out: Path, backbone: str, parts, head_cfg: Mapping, train_cfg: Mapping, seed: int,
                      max_p: int, max_r: int, progress: bool, policy_path=None, cache_root=None,
                      max_batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict:
    enc = load_frozen_encoder(backbone, max_p, max_r, policy_path=policy_path, cache_root=cache_root)
    # Training and validation features in reward.train.precision (bf16: 2.5x faster on avx512_bf16, the same
    # held-out accuracy, docs/benchmarks.md, section 6); the test features always in fp32, so the held-out
    # accuracy is that of the model as it scores by default.
    bf16 = train_cfg.get("precision", "32-true") == "bf16-mixed"
    feats = {}
    for k in ("train", "validation", "test"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and k != "test"):
            feats[k] = encode_pairs(enc, parts[k], max_batch_tokens, progress, f"features ({k})")
    torch.manual_seed(seed)
    head = make_head(enc.dim, int(head_cfg.get("hidden", 256)), float(head_cfg.get("dropout", 0.1)))
    bs = int(train_cfg.get("batch_size", 64))
    train_dl = DataLoader(TensorDataset(*feats["train"]), batch_size=bs, shuffle=True)
    val_dl = DataLoader(TensorDataset(*feats["validation"]), batch_size=512)
    # the head itself trains in fp32 (seconds): the precision setting is for the features
    metrics = fit_bradley_terry(head, lambda h, x: h(x).squeeze(-1), train_dl, val_dl,
                                {**train_cfg, "precision": "32-true"}, seed, progress)
    with torch.no_grad():
        c, r = feats["test"]
        margin = head(c).squeeze(-1) - head(r).squeeze(-1)
        metrics["test_acc"] = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    spec = {"backbone": backbone, "dim": enc.dim, "hidden": int(head_cfg.get("hidden", 256)),
            "dropout": float(head_cfg.get("dropout", 0.1)), "max_prompt_tokens": max_p, "max_response_tokens": max_r}
    (out / "head.json").write_text(json.dumps(spec, indent=2))
    return metrics


# ------------------------------------------------------------------------------ fine-tuned GPT-2 + head
def train_finetuned_policy(out: Path, policy_path: Path, parts, train_cfg: Mapping, seed: int, max_p: int, max_r: int,
                           progress: bool) -> dict:
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(policy_path)
    torch.manual_seed(seed)  # the new score head is initialised here
    model = GPT2ForSequenceClassification.from_pretrained(policy_path, num_labels=1, pad_token_id=tok.pad_token_id,
                                                          use_safetensors=True)
    rm = SequenceClassifierReward(model, tok, max_prompt_tokens=max_p, max_response_tokens=max_r, append_eos=True)
    bs = int(train_cfg.get("batch_size", 16))

    def batches(recs):
        # pairs sorted by length into batches (little padding); the loader shuffles batch order
        recs = sorted(recs, key=lambda r: len(r.prompt) + len(r.chosen) + len(r.rejected))
        out_b = []
        for i in range(0, len(recs), bs):
            chunk = recs[i: i + bs]
            ps = [r.prompt for r in chunk]
            out_b.append((rm.encode(ps, [r.chosen for r in chunk]), rm.encode(ps, [r.rejected for r in chunk])))
        return out_b

    train_dl = DataLoader(batches(parts["train"]), batch_size=None, shuffle=True)
    val_dl = DataLoader(batches(parts["validation"]), batch_size=None)
    metrics = fit_bradley_terry(model, lambda m, b: m(**b).logits[:, 0], train_dl, val_dl, train_cfg, seed, progress)
    metrics["test_acc"] = pairwise_accuracy(rm, parts["test"])
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "reward.json").write_text(json.dumps({"input_format": "concat", "append_eos": True,
                                                 "max_prompt_tokens": max_p, "max_response_tokens": max_r}))
    return metrics
