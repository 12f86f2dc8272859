"""What a run prints: every line once, nothing that is not the user's business, numbers formatted for reading.

`quiet_console()` decides the console output of the libraries under the trainer (`run` calls it first, once Hydra
has set up logging). Lightning's logger has a handler of its own and also propagates to Hydra's: each line came
twice, so Lightning's handlers go and its lines reach the console (and train.log) through Hydra's once. Dropped:
Lightning's tips and its "`Trainer.fit` stopped" notice, a repeat of any other Lightning information line (each
Trainer of a run says "GPU available: ..."), transformers' per-load and per-save bars and its "`loss_type=None`"
notice (None is every config's default), and the FutureWarning Lightning's own use of `LeafSpec()` raises.

`format_number` / `format_metrics`: counts as integers, everything else with 3 decimals, no sign on a value that
rounds to zero (`0.000`, not `-0.000`).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping

__all__ = ["LightningLineFilter", "format_metrics", "format_number", "quiet_console"]

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# where Lightning's rank_zero_info / rank_zero_warn create their records (a logger's filters see only its own records)
LIGHTNING_LINE_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                          "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
QUIET_BARS = frozenset({"Loading weights", "Writing model shards"})  # transformers' per-load / per-save bars
COUNT_KEYS = frozenset({"prompts", "iteration", "step", "epoch"})


class LightningLineFilter(logging.Filter):
    """Drops Lightning's tips and its end-of-fit notice; passes each other information line once per process.
    Lightning (2.6) has no setting for either short of hiding all its information lines
    (tests/test_console.py::test_a_smoke_run_shows_one_progress_bar_and_each_line_once)."""

    DROP = ("💡 Tip:", "`Trainer.fit` stopped: `max_epochs=")

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        if message.startswith(self.DROP) or message in self.seen:
            return False
        self.seen.add(message)
        return True


def _transformers_filter(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("`loss_type=None` was set in the config but it is unrecognized")


_line_filter = LightningLineFilter()
_tqdm_hook_installed = False


def _route_lightning_logs() -> None:
    if not logging.getLogger().handlers:  # nothing else would print them: Lightning keeps its own handler
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console handlers Lightning adds at import
                logger.removeHandler(handler)
        logger.propagate = True


def _quiet_transformers_bars() -> None:
    global _tqdm_hook_installed
    if _tqdm_hook_installed:
        return
    from transformers.utils import logging as hf_logging

    previous = None

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in QUIET_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    _tqdm_hook_installed = True


def quiet_console() -> None:
    """Set up the console for a run (idempotent; see the module's docstring)."""
    _route_lightning_logs()
    for name in LIGHTNING_LINE_LOGGERS:  # addFilter adds a filter once
        logging.getLogger(name).addFilter(_line_filter)
    logging.getLogger("transformers.modeling_utils").addFilter(_transformers_filter)
    _quiet_transformers_bars()
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def format_number(value, digits: int = 3) -> str:
    """`value` for reading: an integer as one, a float with `digits` decimals and without the sign of a value
    that rounds to zero, `n/a` for None. Tensors and numpy scalars are read as Python numbers."""
    if value is None:
        return "n/a"
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def format_metrics(metrics: Mapping, strip: str = "") -> str:
    """`key=value, ...` with `format_number`; a count (`prompts`, `iteration`, ...) holding an integral float is
    written as an integer. `strip` is a prefix removed from the keys (`eval/`)."""
    parts = []
    for key, value in metrics.items():
        name = key.removeprefix(strip)
        if hasattr(value, "item"):
            value = value.item()
        if name.rsplit("/", 1)[-1] in COUNT_KEYS and isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(f"{name}={format_number(value)}")
    return ", ".join(parts)
