"""Refusing a reward model whose context cannot hold one scored pair, before it scores anything.

A pair is scored as the prompt's tail, the response's head and the tokens the model's input format adds; a model
with a shorter context would fail mid-way through the calibration cache with ``IndexError: index out of range in
self``. :func:`check_reward_context` checks a loaded :class:`infalign.models.reward.RewardModel`;
:func:`refuse_reward_context` does the same for one not loaded yet (``reward=trained`` before its build), each with
a one-line ``ConfigError`` that names budgets that fit.
"""
from __future__ import annotations

from infalign.models.checks import check_context, fitting_budgets
from infalign.models.reward import RewardModel


def check_reward_context(rm: RewardModel, prompt_key: str = "reward.max_prompt_tokens",
                         response_key: str = "reward.max_response_tokens") -> None:
    """Refuse (ConfigError, one line) a reward model whose context is shorter than one scored pair: the prompt's
    tail (``prompt_key``), the response's head (``response_key``) and the tokens its input format adds. Called
    as the model loads, before it scores anything (it would fail mid-way through the calibration cache with
    ``IndexError: index out of range in self``)."""
    use = rm.context_use()
    if use is not None:
        refuse_reward_context(*use, rm.source, prompt_key, response_key)


def refuse_reward_context(prompt_tokens: int, response_tokens: int, extra: int, context: tuple[int, str] | None,
                          source: str, prompt_key: str, response_key: str) -> None:
    """:func:`check_reward_context` for a model not loaded yet (``context``: :func:`infalign.models.checks.context_of`
    of its config)."""
    if context is None:
        return
    a, b = fitting_budgets(context[0], prompt_tokens, response_tokens, extra)
    fix = f"lower them to fit, e.g. {prompt_key}={a} {response_key}={b}"
    if prompt_key.startswith("data."):  # reward=trained with null budgets: they can be the reward's own
        fix += f" (or reward.max_prompt_tokens={a} reward.max_response_tokens={b}, for the reward model alone)"
    added = f" (+ {extra} the input format adds)" if extra else ""
    check_context(prompt_tokens + response_tokens + extra, f"{prompt_key} + {response_key}{added}", context, source,
                  fix)
