"""The prompts a run trains and evaluates on, as `Prompt` records: its id, the policy's text, the reward's text."""

from __future__ import annotations

from typing import NamedTuple

import torch

from infalign.models.policy import format_prompts
from infalign.models.prompt_text import truncate_prompt

__all__ = ["Prompt", "prompt_sets"]


class Prompt(NamedTuple):
    id: str  # the dataset's prompt id (the calibration cache's rows)
    text: str  # as the policy reads it (raw HH text or its chat template)
    reward_text: str  # as the reward model reads it (the HH text it was trained on)


def prompt_sets(cfg, partitions, tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """Unique training and evaluation prompts: a seeded subset of train, the first of the eval partition. The HH
    prompt is cut from the left to the token budget; the policy sees it in its own format, the reward model the
    HH text."""

    def unique(records):
        seen = {}
        for r in records:
            seen.setdefault(r.prompt_id, r.prompt)
        return list(seen.items())

    train = unique(partitions["train"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(cfg.calibration.seed)))
    train = [train[i] for i in order[: int(cfg.data.train_prompts)].tolist()]
    part = cfg.data.eval_partition  # a held-out partition (infalign.config)
    held_out = unique(partitions[part])[: int(cfg.data.eval_prompts)]
    for name, got, want in (("train", train, cfg.data.train_prompts), (part, held_out, cfg.data.eval_prompts)):
        if len(got) < want:
            raise ValueError(f"the {name} partition has {len(got)} unique prompts, fewer than the {want} asked "
                             f"(data.{'train' if name == 'train' else 'eval'}_prompts); lower it or use more data")
    budget, fmt = int(cfg.data.max_prompt_tokens), cfg.model.get("prompt_format", "raw")

    def render(items):
        hh = [truncate_prompt(p, tokenizer, budget) for _, p in items]
        return [Prompt(pid, text, reward) for (pid, _), text, reward in zip(items, format_prompts(hh, tokenizer, fmt), hh)]

    return render(train), render(held_out)
