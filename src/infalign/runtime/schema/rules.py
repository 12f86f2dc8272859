"""The value rules of the config schema: `Rule` (a test and the text that completes "<key> must be ..."), its
builders (`integer`, `number`, `one_of`, `nullable`, `list_of`), the shared rules (`BOOL`, `TEXT`, `SEED`, ...),
and the constants mirrored from torch-importing modules (tests/test_config.py checks that they agree)."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

SEED_MAX = 2**32 - 1  # Lightning's seed_everything replaces a seed outside [0, 2^32 - 1] by 0, with a warning
# Mirrors of constants that live in torch-importing modules (tests/test_config.py checks that they agree):
RL_ALGOS = ("rloo", "ppo")  # infalign.trainer.solvers.rloo.ALGOS
KL_PENALTY_MODES = ("reward", "exact")  # infalign.core.losses.KL_PENALTY_MODES
PARTITIONS = ("train", "validation", "test")  # infalign.models.data.PARTITIONS
SAMPLERS = ("inverse_cdf", "multinomial")  # infalign.models.pure_sampling.SAMPLERS
# Lightning's precision strings (lightning.fabric.plugins.precision.precision._PRECISION_INPUT), aliases last
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64", 32, 16, 64)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's registry plus its aliases auto, gpu
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


class ConfigError(ValueError):
    """A config value refused: one line naming the key, what is allowed, the value and an example."""


def exit_on_user_error(e: ConfigError) -> NoReturn:
    """How an entry point reports a refused input: one line `error: ...` on stderr and exit status 2, as for a
    command-line usage error (no traceback: Hydra would print its shortened one above the message). With
    HYDRA_FULL_ERROR=1 the error is raised again, for the whole traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------- value rules
@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    allowed: str  # completes "<key> must be ..."


def _show(v) -> str:
    """A value as the message shows it: YAML's true/false/null, strings quoted (so `seed='abc'` reads as text)."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return repr(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, *, integral_float: bool = False) -> Rule:
    """An integer in [lo, hi]; `integral_float`: 4.0 counts as 4 (N, which the theory also takes as a float)."""
    def test(v):
        ok = _int(v) or (integral_float and _real(v) and float(v).is_integer())
        return ok and (lo is None or v >= lo) and (hi is None or v <= hi)
    what = "a positive integer" if lo == 1 and hi is None else "an integer"
    bounds = f" from {lo} to {hi}" if hi is not None else f" >= {lo}" if lo not in (None, 1) else ""
    return Rule(test, what + bounds)


def number(*, gt=None, ge=None, le=None, lt=None) -> Rule:
    """A finite number (an int or a float, not a bool) within the bounds given."""
    def test(v):
        return _real(v) and (gt is None or v > gt) and (ge is None or v >= ge) and \
            (le is None or v <= le) and (lt is None or v < lt)
    if gt == 0 and ge is le is lt is None:
        return Rule(test, "a positive finite number")
    if ge is not None and (le is not None or lt is not None):
        return Rule(test, f"a number in [{ge}, {le}]" if le is not None else f"a number in [{ge}, {lt})")
    bounds = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<=", le), ("<", lt)) if b is not None]
    return Rule(test, " ".join(["a number", *bounds]))


def one_of(*values, text: str | None = None) -> Rule:
    shown = [_show(v) for v in values]
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
SEED = integer(0, SEED_MAX)
TARGET = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"[\w.]+", v) is not None, "a dotted import path")
INSTANTIATED = Rule(lambda v: isinstance(v, Mapping) and isinstance(v.get("_target_"), str), "a mapping with _target_")


def _devices(v) -> bool:
    """Lightning's `devices`: a count >= 1, -1 or auto (all), a list of device indices, or such a list as text."""
    if _int(v):
        return v >= 1 or v == -1
    if isinstance(v, list):
        return bool(v) and all(_int(x) and x >= 0 for x in v)
    if isinstance(v, str):
        s = v.replace(" ", "")
        if "," in s:  # "0,1" or "0,": device indices
            return re.fullmatch(r"\d+(,\d+)*,?", s) is not None
        return s in ("auto", "-1") or (s.isdigit() and int(s) >= 1)
    return False


def _fractions(v) -> bool:
    return (isinstance(v, Mapping) and set(v) <= set(PARTITIONS) and all(_real(x) and x >= 0 for x in v.values())
            and abs(sum(v.values()) - 1.0) <= 1e-6)
