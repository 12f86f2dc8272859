"""An HH prompt's text as a model reads it: cut from the left to a token budget, or turned into chat messages.

`truncate_prompt` keeps the final ``Assistant:`` marker and moves the cut to the next turn boundary where one
exists (so a model never sees half a turn);
`hh_to_messages` turns a prompt into ``user`` / ``assistant`` messages for chat-template models. The records
themselves are read and partitioned by `infalign.models.data`.
"""
from __future__ import annotations

import re

from infalign.models.data import ASSISTANT, HUMAN


# ------------------------------------------------------------------------------------------- truncation
def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_prompt(prompt: str, tokenizer, max_tokens: int) -> str:
    """Drop text from the left until ``prompt`` fits ``max_tokens``, keeping the final Assistant marker.

    The cut is moved forward to the next turn boundary when one exists, so the model never sees half a
    turn; when the last Human turn alone is too long it is cut mid-turn (the marker is still kept).
    """
    if max_tokens is None or _n_tokens(tokenizer, prompt) <= max_tokens:
        return prompt
    if not prompt.endswith(ASSISTANT):
        raise ValueError("prompt does not end with the '\\n\\nAssistant:' marker")
    if _n_tokens(tokenizer, ASSISTANT) + 1 > max_tokens:
        raise ValueError(f"max_prompt_tokens={max_tokens} cannot hold the Assistant marker")
    lo, hi = 0, len(prompt) - len(ASSISTANT)  # smallest start offset whose suffix fits: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        if _n_tokens(tokenizer, prompt[mid:]) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    body_end = len(prompt) - len(ASSISTANT)
    starts = [i for i in (prompt.find(HUMAN, lo), prompt.find(ASSISTANT, lo)) if 0 <= i < body_end]
    start = min(starts) if starts else lo
    out = prompt[start:]
    while _n_tokens(tokenizer, out) > max_tokens and len(out) > len(ASSISTANT):
        out = out[1:]  # BPE merges at the cut can differ by a token; shave until it fits
    return out


def hh_to_messages(prompt: str) -> list[dict[str, str]]:
    """Turn an HH prompt into chat messages (``user``/``assistant``), for chat-template models.

    A left-truncated prompt may start mid-turn; that leading fragment becomes a ``user`` message.
    """
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    # parts = [leading text, "Human", text, "Assistant", text, ..., "Assistant", ""]
    msgs = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, text in zip(parts[1::2], parts[2::2]):
        if text.strip() or role == "Human":
            msgs.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    return msgs
