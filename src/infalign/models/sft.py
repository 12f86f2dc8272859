"""Supervised fine-tuning (SFT) of the reference policy on the chosen dialogues of the training partition, and
the training loop it shares with the Bradley-Terry reward model (:func:`fit`).

Loss on all tokens by default (``loss_on: all``): the tiny reference is trained from scratch on ~1.8k
dialogues, and the prompt side (Human turns and earlier Assistant turns) is ~3/4 of the tokens; training on
responses only would throw away most of the little English the model can learn from. Validation reports
both the all-token perplexity and the perplexity of the final responses (what the policy generates).
"""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from infalign.models.data import PreferenceRecord
from infalign.models.prompt_text import truncate_prompt

IGNORE = -100


def encode_dialogue(prompt: str, response: str, tokenizer, max_prompt_tokens: int | None,
                    max_response_tokens: int | None) -> tuple[list[int], int]:
    """Token ids of ``prompt + response (+ eos)`` and the number of prompt tokens.

    Prompt and response are tokenized separately (the boundary is then exact, as at generation time,
    where the response ids follow the prompt ids). EOS is appended only when the response was not cut,
    so the model learns to stop where real answers stop, not at the truncation budget.
    """
    prompt = truncate_prompt(prompt, tokenizer, max_prompt_tokens)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if max_response_tokens is not None and len(r_ids) > max_response_tokens:
        r_ids = r_ids[:max_response_tokens]
    else:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids + r_ids, len(p_ids)


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int, loss_on: str = "all") -> dict[str, torch.Tensor]:
    """Right-padded batch (training needs no left padding; positions then start at 0 for every row)."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    response_labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = t
        response_labels[i, n_prompt: len(ids)] = t[n_prompt:]
    if loss_on == "response":
        labels = response_labels.clone()
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "response_labels": response_labels}


def bucketed_batches(examples: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                     loss_on: str = "all") -> list[dict[str, torch.Tensor]]:
    """Pre-collated batches of similar length (little padding); the DataLoader shuffles their order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    return [collate([examples[i] for i in order[s: s + batch_size]], pad_id, loss_on)
            for s in range(0, len(order), batch_size)]


def sft_loaders(records: Mapping[str, list[PreferenceRecord]], tokenizer, *, batch_size: int,
                max_prompt_tokens: int | None, max_response_tokens: int | None,
                loss_on: str = "all") -> tuple[DataLoader, DataLoader]:
    def examples(recs):
        return [encode_dialogue(r.prompt, r.chosen, tokenizer, max_prompt_tokens, max_response_tokens) for r in recs]

    pad = tokenizer.pad_token_id
    train = bucketed_batches(examples(records["train"]), batch_size, pad, loss_on)
    val = bucketed_batches(examples(records["validation"]), batch_size, pad, loss_on)
    # batch_size=None: items already are batches
    return DataLoader(train, batch_size=None, shuffle=True), DataLoader(val, batch_size=None)


def warmup_cosine_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The learning-rate factor at optimizer step `step`: linear warm-up from 1/warmup over `warmup` steps, then a
    cosine down to `floor` at `total`. The one schedule of every training here (the reference's SFT, the reward
    head, and the policy's through `infalign.trainer.schedules.warmup_cosine`)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fit(net: torch.nn.Module, loss: Callable[[Any], torch.Tensor], evaluate: Callable[[Iterable], dict[str, float]],
        train_dl: DataLoader, val_dl: DataLoader, train_cfg: Mapping, *, epochs: int, params: list,
        score: Callable[[dict], float], floor: float, betas: tuple[float, float] = (0.9, 0.999),
        progress: bool = True, desc: str = "training") -> dict[str, Any]:
    """Train `net` on `loss(batch)` for `epochs` epochs and end with the weights of the epoch whose validation
    metrics (`evaluate(val_dl)`, after each epoch) `score` highest: with ~1.8k examples the last epoch can already
    overfit. AdamW over `params` (tensors or groups), `warmup_cosine_factor` down to `floor` per optimizer step,
    gradients clipped to `grad_clip`; `precision: bf16-mixed` runs the forward passes under CPU autocast. Returns
    the best epoch's metrics with its "epoch", and the per-epoch "history"."""
    total = epochs * len(train_dl)
    warmup = int(train_cfg.get("warmup_steps", max(1, total // 20)))
    opt = torch.optim.AdamW(params, lr=float(train_cfg.get("lr", 1e-3)),
                            weight_decay=float(train_cfg.get("weight_decay", 0.01)), betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_factor(s, warmup, total, floor))
    clip = float(train_cfg.get("grad_clip", 1.0))
    # bf16-mixed: as Lightning runs it, without autocast's cache of cast weights (with it, the chosen and rejected
    # passes of one Bradley-Terry step would share one cast and sum their gradients in bf16)
    bf16 = train_cfg.get("precision", "32-true") == "bf16-mixed"
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    best: dict[str, Any] = {"score": -math.inf, "metrics": {}, "state": None}
    history, shown = [], {}
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for epoch in range(epochs):
        net.train()
        for batch in train_dl:
            with autocast():
                value = loss(batch)
            opt.zero_grad()
            value.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{value.item():.3f}", **shown)
        net.eval()
        with torch.no_grad(), autocast():
            metrics = {"epoch": epoch, **evaluate(val_dl)}
        history.append(metrics)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k != "epoch"}
        if score(metrics) > best["score"]:
            best = {"score": score(metrics), "metrics": metrics, "state": copy.deepcopy(net.state_dict())}
    bar.close()
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    return {**best["metrics"], "history": history}


@torch.no_grad()
def perplexities(model: torch.nn.Module, val_dl: Iterable) -> dict[str, float]:
    """Validation perplexity over every real token (whatever loss_on trained on) and over the final responses."""
    ppl, response_ppl = Perplexity(ignore_index=IGNORE), Perplexity(ignore_index=IGNORE)
    for batch in val_dl:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # position t predicts token t+1
        ppl.update(logits, batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE))
        response_ppl.update(logits, batch["response_labels"][:, 1:])
    value = float(ppl.compute())
    return {"val/ppl": value, "val/response_ppl": float(response_ppl.compute()), "val/loss": math.log(value)}


def run_sft(model: torch.nn.Module, tokenizer, records: Mapping[str, list[PreferenceRecord]],
            train_cfg: Mapping, *, max_prompt_tokens: int | None, max_response_tokens: int | None,
            seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` (any ``transformers`` causal LM) in place; returns the best validation metrics (always those
    of the fp32 model, whatever precision trained it) and the per-epoch history."""
    L.seed_everything(seed, workers=True, verbose=False)
    train_dl, val_dl = sft_loaders(records, tokenizer, batch_size=int(train_cfg.get("batch_size", 16)),
                                   max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                                   loss_on=train_cfg.get("loss_on", "all"))
    epochs = int(train_cfg.get("epochs", 3))
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": float(train_cfg.get("weight_decay", 0.01))},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    metrics = fit(model, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                         labels=b["labels"]).loss,
                  lambda dl: perplexities(model, dl), train_dl, val_dl, train_cfg, epochs=epochs, params=groups,
                  score=lambda m: -m["val/loss"], floor=0.1, betas=(0.9, 0.98), progress=progress, desc="SFT")
    model.eval()
    if train_cfg.get("precision", "32-true") != "32-true":
        with torch.autocast("cpu", enabled=False):
            metrics.update(perplexities(model, val_dl))
    return {**metrics, "train_steps": epochs * len(train_dl)}
