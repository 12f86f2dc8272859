"""The value rules of the config: `Rule` (a test and the text that completes "<key> must be ..."), its builders,
and the shared rules."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

YAML = {None: "null", True: "true", False: "false"}


@dataclass(frozen=True)
class Rule:
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


def integer(lo: int, hi: int | None = None, *, integral_float: bool = False) -> Rule:
    """An integer in [lo, hi]; `integral_float`: 4.0 counts as 4 (N, which the theory also takes as a float)."""
    def test(v):
        ok = is_int(v) or (integral_float and is_real(v) and float(v).is_integer())
        return ok and v >= lo and (hi is None or v <= hi)
    if hi is not None:
        return Rule(test, f"an integer from {lo} to {hi}")
    return Rule(test, "a positive integer" if lo == 1 else f"an integer >= {lo}")


def number(interval: str) -> Rule:
    """A finite number (an int or a float, not a bool) in `interval`: "(0, inf)", "[0, inf)", "[0, 1)", ..."""
    lo, hi = (float(bound) for bound in interval[1:-1].split(","))

    def test(v):
        return is_real(v) and (v >= lo if interval[0] == "[" else v > lo) and \
            (v <= hi if interval[-1] == "]" else v < hi)
    named = {"(0, inf)": "a positive finite number", "[0, inf)": "a number >= 0"}
    return Rule(test, named.get(interval, f"a number in {interval}"))


def one_of(*values, text: str | None = None) -> Rule:
    shown = [show(v) for v in values]
    listed = " or ".join(shown) if len(shown) <= 2 else f"one of {', '.join(shown)}"
    # `True in (1,)` is true in Python: compare types too, so `resume=1` is not `resume=true`
    return Rule(lambda v: any(v == x and type(v) is type(x) for x in values), text or listed)


def nullable(rule: Rule, meaning: str) -> Rule:
    return Rule(lambda v: v is None or rule.test(v), f"null ({meaning}) or {rule.allowed}")


def list_of(rule: Rule, what: str, *, nonempty: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, list) and (bool(v) or not nonempty) and all(rule.test(x) for x in v),
                f"a {'non-empty ' if nonempty else ''}list of {what}")


BOOL = one_of(True, False, text="true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
SEED = integer(0, 2**32 - 1)  # Lightning's seed_everything replaces a seed outside it by 0, with a warning
TARGET = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"[\w.]+", v) is not None, "a dotted import path")
INSTANTIATED = Rule(lambda v: isinstance(v, Mapping) and isinstance(v.get("_target_"), str), "a mapping with _target_")
ANY = Rule(lambda v: True, "anything")


def devices(v) -> bool:
    """Lightning's `devices`: a count >= 1, -1 or auto (all), a list of device indices, or such a list as text."""
    if is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, list):
        return bool(v) and all(is_int(x) and x >= 0 for x in v)
    if isinstance(v, str):
        s = v.replace(" ", "")
        if "," in s:  # "0,1" or "0,": device indices
            return re.fullmatch(r"\d+(,\d+)*,?", s) is not None
        return s in ("auto", "-1") or (s.isdigit() and int(s) >= 1)
    return False


def fractions(v) -> bool:
    return (isinstance(v, Mapping) and set(v) <= {"train", "validation", "test"}
            and all(is_real(x) and x >= 0 for x in v.values()) and abs(sum(v.values()) - 1.0) <= 1e-6)


def processes(trainer: Mapping) -> int | None:
    """Processes a checked trainer config (plain data) starts: devices x num_nodes; None when Lightning decides
    (auto, -1)."""
    n, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(n, str):  # "2", "0,1" (device indices), "auto"
        n = [d for d in n.split(",") if d.strip()] if "," in n else int(n) if n.strip().isdigit() else None
    count = len(n) if isinstance(n, list) else n if is_int(n) and n >= 1 else None
    return count * (nodes if is_int(nodes) else 1) if count else None
