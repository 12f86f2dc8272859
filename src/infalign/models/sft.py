"""Supervised fine-tuning (SFT) of the reference policy on the chosen dialogues of the training partition.

Loss on all tokens by default (``loss_on: all``): the tiny reference is trained from scratch on ~1.8k
dialogues, and the prompt side (Human turns and earlier Assistant turns) is ~3/4 of the tokens; training on
responses only would throw away most of the little English the model can learn from. Validation reports
both the all-token perplexity and the perplexity of the final responses (what the policy generates).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

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


class BestValidationModule(L.LightningModule):
    """What SFT and the Bradley-Terry reward share: AdamW over the warm-up + cosine schedule (stepped every optimizer
    step), and the weights of the best validation epoch by ``monitor``, restored when fit ends (with ~1.8k dialogues
    the last epoch can already overfit). A subclass hands each validation epoch's metrics to `end_validation_epoch`."""

    monitor: str  # the metric that picks the best epoch, and whether lower ("min") or higher ("max") is better
    mode: str
    betas, lr_floor = (0.9, 0.999), 0.0

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 50, total_steps: int = 1000):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def end_validation_epoch(self, metrics: dict[str, float]) -> None:
        self.log_dict(metrics, prog_bar=True)
        self.history.append({"epoch": self.current_epoch, **metrics})
        score, best = metrics[self.monitor], self.best_metrics.get(self.monitor)
        if best is None or ((score > best) if self.mode == "max" else (score < best)):
            self.best_metrics = {**metrics, "epoch": self.current_epoch}
            self.best_state = copy.deepcopy(self.model.state_dict())

    def on_fit_end(self):
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.param_groups(), lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine_factor(s, self.warmup_steps, self.total_steps, self.lr_floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(module_type: type[BestValidationModule], model: torch.nn.Module, train_dl: DataLoader, val_dl: DataLoader,
        train_cfg: Mapping, *, epochs: int, seed: int, progress: bool, **module_args) -> BestValidationModule:
    """Trains ``model`` in place and returns its `module_type` module, which holds the best validation metrics.
    Lightning runs the loop on the CPU (``train_cfg.precision``, gradients clipped at ``train_cfg.grad_clip``; no
    logger, no checkpoints); the model ends with its best-validation weights, in eval mode."""
    total = epochs * len(train_dl)
    module = module_type(model, lr=float(train_cfg.get("lr", 1e-3)),
                         weight_decay=float(train_cfg.get("weight_decay", 0.01)),
                         warmup_steps=int(train_cfg.get("warmup_steps", max(1, total // 20))), total_steps=total,
                         **module_args)
    L.seed_everything(seed, workers=True, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                        gradient_clip_val=float(train_cfg.get("grad_clip", 1.0)), log_every_n_steps=10,
                        deterministic=False, precision=train_cfg.get("precision", "32-true"))
    module.train()  # callers may hand over a model in eval mode (from_pretrained returns one)
    trainer.fit(module, train_dl, val_dl)
    module.eval()
    return module


class SFTModule(BestValidationModule):
    """Causal-LM fine-tuning of any ``transformers`` causal LM; keeps the weights of the lowest validation loss."""

    monitor, mode = "val/loss", "min"
    betas, lr_floor = (0.9, 0.98), 0.1

    def __init__(self, model: torch.nn.Module, **optim):
        super().__init__(model, **optim)
        self.val_ppl = Perplexity(ignore_index=IGNORE)
        self.val_response_ppl = Perplexity(ignore_index=IGNORE)

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # position t predicts token t+1
        # the all-token metric always covers every real token, whatever loss_on trained on
        all_labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE)
        self.val_ppl.update(logits, all_labels)
        self.val_response_ppl.update(logits, batch["response_labels"][:, 1:])

    def on_validation_epoch_end(self):
        self.end_validation_epoch(self.pop_perplexities())

    def pop_perplexities(self) -> dict[str, float]:
        """The validation metrics of the batches seen since the last call; the counts then start again."""
        ppl, rppl = float(self.val_ppl.compute()), float(self.val_response_ppl.compute())
        self.val_ppl.reset()
        self.val_response_ppl.reset()
        return {"val/ppl": ppl, "val/response_ppl": rppl, "val/loss": math.log(ppl)}

    def param_groups(self) -> list[dict[str, Any]]:
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate_fp32(module: SFTModule, val_dl: DataLoader) -> dict[str, float]:
    """Validation perplexities of ``module.model`` as it is, in fp32 (no autocast)."""
    module.val_ppl.reset()
    module.val_response_ppl.reset()
    device = next(module.model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for batch in val_dl:
            module.validation_step(batch, 0)
    return module.pop_perplexities()


def run_sft(model: torch.nn.Module, tokenizer, records: Mapping[str, list[PreferenceRecord]],
            train_cfg: Mapping, *, max_prompt_tokens: int | None, max_response_tokens: int | None,
            seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place; returns the best validation metrics and the per-epoch history."""
    train_dl, val_dl = sft_loaders(records, tokenizer, batch_size=int(train_cfg.get("batch_size", 16)),
                                   max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                                   loss_on=train_cfg.get("loss_on", "all"))
    module = fit(SFTModule, model, train_dl, val_dl, train_cfg, epochs=int(train_cfg.get("epochs", 3)), seed=seed,
                 progress=progress)
    if train_cfg.get("precision", "32-true") != "32-true":  # the reported perplexity is the fp32 model's
        module.best_metrics.update(validate_fp32(module, val_dl))
    return {**module.best_metrics, "history": module.history, "train_steps": module.total_steps}
