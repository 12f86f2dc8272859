"""The value rules of the config (`Rule`: a test and the text that completes "<key> must be ..."), their builders,
and how a message shows a value."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

YAML = {None: "null", True: "true", False: "false"}


class Rule(NamedTuple):
    test: Callable[[Any], bool]
    allowed: str  # completes "<key> must be ..."


def show(v) -> str:
    """A value as a message shows it: YAML's true/false/null, strings quoted (so `seed='abc'` reads as text)."""
    return YAML[v] if v is None or isinstance(v, bool) else repr(v)


def cli(v) -> str:
    """A value as typed on the command line."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(cli, v)) + "]"
    return YAML[v] if v is None or isinstance(v, bool) else str(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: float = math.inf) -> Rule:
    if hi < math.inf:
        allowed = f"an integer from {lo} to {hi}"
    else:
        allowed = "a positive integer" if lo == 1 else f"an integer >= {lo}"
    return Rule(lambda v: is_int(v) and lo <= v <= hi, allowed)


def real(test: Callable[[float], bool], allowed: str) -> Rule:
    """A finite number (an int or a float, not a bool) that passes `test`."""
    return Rule(lambda v: is_real(v) and test(v), allowed)


def one_of(*values, text: str | None = None) -> Rule:
    shown = [show(v) for v in values]
    listed = " or ".join(shown) if len(shown) <= 2 else f"one of {', '.join(shown)}"
    # `True == 1` in Python: compare types too, so `resume=1` is not `resume=true`
    return Rule(lambda v: any(v == x and type(v) is type(x) for x in values), text or listed)


def nullable(rule: Rule, meaning: str) -> Rule:
    return Rule(lambda v: v is None or rule.test(v), f"null ({meaning}) or {rule.allowed}")


def list_of(rule: Rule, what: str, *, nonempty: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, list) and (bool(v) or not nonempty) and all(map(rule.test, v)),
                f"a {'non-empty ' if nonempty else ''}list of {what}")


def device_count(v) -> int | None:
    """Lightning's `devices` as processes per node: None for auto or -1 (Lightning decides), 0 for a value it
    refuses (it takes a count >= 1, -1 or auto, a list of device indices, or such a list as text)."""
    if isinstance(v, str) and "," in v:  # device indices: "0,1", "0,"
        return len(v.rstrip(", ").split(",")) if re.fullmatch(r"\d+(,\d+)*,?", v.replace(" ", "")) else 0
    if isinstance(v, str):  # "2", "auto", "-1"
        v = -1 if v.strip() in ("auto", "-1") else int(v) if v.strip().isdigit() else 0
    if isinstance(v, list):
        return len(v) if v and all(is_int(x) and x >= 0 for x in v) else 0
    return None if is_int(v) and v == -1 else v if is_int(v) and v >= 1 else 0


def processes(trainer: Mapping) -> int | None:
    """Processes a checked trainer config starts: devices x num_nodes; None when Lightning decides (auto, -1)."""
    count = device_count(trainer.get("devices", "auto"))
    return count * trainer.get("num_nodes", 1) if count else None
