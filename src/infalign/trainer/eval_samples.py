"""What a row of `eval_samples.jsonl` (and of the logger's table `eval/samples`) holds, and how its prompt is shown.

For each of the first `eval.log_samples` held-out prompts at every evaluation: the policy's first sample, the
reference's first cached one, and the pick of the run's best-of-n (worst-of-n for a worst-of-N run) among the
first n of each by raw reward, as the win rate compares them; each with its length in tokens and its raw and
calibrated rewards. Rows of an evaluation that a resumed run repeats are replaced, never doubled.
"""
from __future__ import annotations

import re

from infalign.models.data import ASSISTANT, HUMAN

__all__ = ["SAMPLE_COLUMNS", "SAMPLE_SIDES", "SAMPLES_JSONL", "SAMPLES_KEY", "shown_prompt"]

SAMPLES_JSONL = "eval_samples.jsonl"  # eval.log_samples prompts per evaluation: responses and rewards
SAMPLES_KEY = "eval/samples"  # the logger's table of them
SAMPLE_SIDES = ("policy", "reference", "policy_pick", "reference_pick")  # first samples, then the best-of-n picks
SAMPLE_COLUMNS = ("iteration", "step", "prompt_id", "prompt", "pick",
                  *(f"{side}_{c}" for side in SAMPLE_SIDES
                    for c in ("response", "tokens", "reward_raw", "reward_calibrated")))


def shown_prompt(prompt: str) -> str:
    """The prompt as the samples show it: as the models read it, but if `truncate_prompt` cut it from the left
    mid-turn (it then starts at no turn marker, usually mid-word), from its first whole word, after "…"."""
    if prompt.startswith((HUMAN, ASSISTANT)):
        return prompt  # whole, or cut at a turn boundary
    body_end = len(prompt) - len(ASSISTANT) if prompt.endswith(ASSISTANT) else len(prompt)
    partial = re.compile(r"\S*\s+").match(prompt, 0, body_end)  # the word the cut may have split, its space
    return "…" + (prompt[partial.end():] if partial else prompt)
