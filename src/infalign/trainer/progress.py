"""One progress bar over the run's iterations (`progress=true`), instead of Lightning's bar per epoch.

An RL iteration is one Lightning epoch of one batch, so Lightning's `TQDMProgressBar` restarts every iteration at
"Epoch <i>: 1/1" and its rate says nothing (tests/test_console.py::
test_a_smoke_run_shows_one_progress_bar_and_each_line_once fails with it). This bar spans the whole run, shows the
iteration's KL and calibrated reward and the latest evaluation's target win rate, and writes console log lines
above itself while open. Rank 0 draws it.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from infalign.runtime.console import format_number

__all__ = ["BAR_DESCRIPTION", "IterationProgressBar", "win_rate_shown"]

BAR_DESCRIPTION = "iterations"


def win_rate_shown(metric: str | None, n: int) -> tuple[str, str]:
    """`(eval key, label)` of the win rate the bar shows: the target metric's at the run's N (`bon@4`, `won@4`),
    the standard win rate (`win`) for a method aimed at it."""
    if metric == "won":
        return f"eval/won_win_rate@{n}", f"won@{n}"
    if metric == "std":
        return "eval/bon_win_rate@1", "win"
    return f"eval/bon_win_rate@{n}", f"bon@{n}"


class IterationProgressBar(ProgressBar):
    """A single tqdm bar over the iterations; `win_rates` is the run's `WinRateCallback` (its `latest` results),
    `win_rate_key` / `label` which win rate to show (`win_rate_shown`)."""

    def __init__(self, win_rates=None, win_rate_key: str | None = None, label: str = "win"):
        super().__init__()
        self.win_rates, self.win_rate_key, self.label = win_rates, win_rate_key, label
        self.enabled = True
        self.bar: tqdm | None = None
        self._redirect: ExitStack | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def postfix(self, trainer) -> str:
        metrics = trainer.callback_metrics
        parts = [f"{key}={format_number(metrics[key])}" for key in ("kl", "reward") if key in metrics]
        latest = getattr(self.win_rates, "latest", None)
        if latest and self.win_rate_key in latest:
            parts.append(f"{self.label}={format_number(latest[self.win_rate_key])}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, module) -> None:
        if not self.enabled or self.bar is not None:
            return
        self._redirect = ExitStack()
        root = logging.getLogger()
        if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in root.handlers):
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))  # only a console handler moves
        self.bar = tqdm(total=trainer.max_epochs, initial=trainer.current_epoch, desc=BAR_DESCRIPTION, unit="it",
                        dynamic_ncols=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        # after the WinRateCallback's hook (earlier in the callbacks): an evaluation at this iteration is shown
        if self.bar is None:
            return
        self.bar.set_postfix_str(self.postfix(trainer), refresh=False)
        self.bar.update(max(trainer.current_epoch + 1 - self.bar.n, 0))

    def on_train_end(self, trainer, module) -> None:
        # after the final evaluation (WinRateCallback.on_train_end runs first): its win rate is the last shown
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(trainer), refresh=False)
        self._close()

    def on_exception(self, trainer, module, exception) -> None:
        self._close()

    def teardown(self, trainer, module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
