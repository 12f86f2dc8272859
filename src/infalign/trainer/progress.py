"""One progress bar over the run's iterations (`progress=true`), instead of Lightning's bar per epoch.

An RL iteration is one Lightning epoch of one batch, so Lightning's stock `TQDMProgressBar` restarts every
iteration at "Epoch <i>: 1/1" and its rate says nothing (tests/test_console.py::
test_a_smoke_run_shows_one_progress_bar_and_each_line_once fails with it). This subclass of it spans the whole
run, shows the iteration's KL and calibrated reward and the latest evaluation's target win rate, and writes console
log lines above itself while open. Rank 0 draws it.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack

from lightning.pytorch.callbacks import TQDMProgressBar
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


class IterationProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, over the iterations instead of each epoch's one batch; `win_rates` is the run's
    `WinRateCallback` (its `latest` results), `win_rate_key` / `label` which win rate to show (`win_rate_shown`)."""

    def __init__(self, win_rates=None, win_rate_key: str | None = None, label: str = "win"):
        super().__init__()
        self.win_rates, self.win_rate_key, self.label = win_rates, win_rate_key, label
        self._redirect = ExitStack()  # console log lines above the bar while it is open

    def init_train_tqdm(self) -> tqdm:
        # the whole run (`rl.iterations`), counting from where a resumed run starts
        return tqdm(total=self.trainer.max_epochs, initial=self.trainer.current_epoch, desc=BAR_DESCRIPTION,
                    unit="it", dynamic_ncols=True, disable=self.is_disabled)

    def get_metrics(self, trainer, module) -> dict[str, str]:
        # the iteration's KL and calibrated reward (logged with prog_bar=True), the latest evaluation's win rate
        shown = {key: trainer.callback_metrics[key] for key in ("kl", "reward") if key in trainer.callback_metrics}
        latest = getattr(self.win_rates, "latest", None)
        if latest and self.win_rate_key in latest:
            shown[self.label] = latest[self.win_rate_key]
        return {key: format_number(value) for key, value in shown.items()}

    def on_train_start(self, trainer, module) -> None:
        root = logging.getLogger()
        if not self.is_disabled and any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                                        for h in root.handlers):
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))  # only a console handler moves
        super().on_train_start(trainer, module)

    def on_train_epoch_start(self, *_) -> None:
        pass  # one bar for the run: not reset at every iteration

    def on_train_batch_end(self, *_) -> None:
        pass  # advanced once per iteration, at its end

    def on_train_epoch_end(self, trainer, module) -> None:
        # after the WinRateCallback's hook (earlier in the callbacks): an evaluation at this iteration is shown
        super().on_train_epoch_end(trainer, module)
        self.train_progress_bar.update(max(trainer.current_epoch + 1 - self.train_progress_bar.n, 0))

    def on_train_end(self, trainer, module) -> None:
        # after the final evaluation (WinRateCallback.on_train_end runs first): its win rate is the last shown
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        super().on_train_end(trainer, module)
        self._redirect.close()

    def on_exception(self, trainer, module, exception) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()
        self._redirect.close()
