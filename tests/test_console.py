"""What a run prints: one progress bar over the iterations, every line once, no tips, numbers for reading."""

import logging
import re

import numpy as np
import torch

from infalign.runtime.console import LightningLineFilter, format_metrics, format_number, quiet_console
from infalign.trainer.progress import BAR_DESCRIPTION, win_rate_shown


def test_format_number_is_for_reading():
    assert format_number(6) == "6" and format_number(np.int64(6)) == "6" and format_number(torch.tensor(6)) == "6"
    assert format_number(0.41752) == "0.418" and format_number(torch.tensor(0.41752)) == "0.418"
    assert format_number(-0.0004) == "0.000"  # rounds to zero: no sign
    assert format_number(-0.004) == "-0.004"  # a sign only where the value has one
    assert format_number(-0.0) == "0.000"
    assert format_number(1.23456, digits=1) == "1.2"
    assert format_number(None) == "n/a" and format_number(float("nan")) == "nan" and format_number(True) == "True"


def test_format_metrics_writes_counts_as_integers():
    line = format_metrics({"eval/kl": -0.0002, "eval/bon_win_rate@4": 0.41752, "eval/prompts": 6.0}, strip="eval/")
    assert line == "kl=0.000, bon_win_rate@4=0.418, prompts=6"


def test_win_rate_shown_follows_the_target_metric():
    assert win_rate_shown("bon", 4) == ("eval/bon_win_rate@4", "bon@4")
    assert win_rate_shown("won", 8) == ("eval/won_win_rate@8", "won@8")
    assert win_rate_shown("std", 4) == ("eval/bon_win_rate@1", "win")


def _record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("lightning.pytorch.utilities.rank_zero", level, __file__, 1, message, None, None)


def test_lightning_line_filter_drops_tips_and_repeats():
    f = LightningLineFilter()
    assert not f.filter(_record("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger"))
    assert not f.filter(_record("`Trainer.fit` stopped: `max_epochs=2` reached."))
    assert f.filter(_record("GPU available: False, used: False"))
    assert not f.filter(_record("GPU available: False, used: False"))  # a second Trainer in the process
    warning = _record("something is wrong", logging.WARNING)
    assert f.filter(warning) and f.filter(warning)  # warnings always pass


def test_quiet_console_sends_lightning_lines_through_the_root_logger_only():
    import lightning  # noqa: F401 - its import adds the "INFO: ..." handler

    assert logging.getLogger().handlers  # pytest's capture handlers: the root logger prints
    quiet_console()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        assert logger.propagate and not [h for h in logger.handlers if type(h) is logging.StreamHandler]


def test_a_smoke_run_shows_one_progress_bar_and_each_line_once(run_train, tmp_path):
    iterations = 3
    smoke = ["scale=smoke", "logger=none", "eval.every=2"]
    # the models and the calibration cache built first, quietly: the run below is the RL loop's console alone
    run_train(*smoke, "progress=false", "rl.iterations=1", f"hydra.run.dir={tmp_path / 'warm'}")
    out = run_train(*smoke, "progress=true", f"rl.iterations={iterations}", f"hydra.run.dir={tmp_path / 'run'}")
    text = out.stdout + out.stderr
    # one bar over the iterations: every frame of it has the same total, its count never goes back, it ends full
    frames = re.findall(rf"{BAR_DESCRIPTION}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[([^\]]*)\]", out.stderr)
    assert frames, out.stderr[-3000:]
    assert {int(total) for _, total, _ in frames} == {iterations}
    counts = [int(n) for n, _, _ in frames]
    assert counts == sorted(counts) and counts[-1] == iterations
    last = frames[-1][2]
    assert "kl=" in last and "reward=" in last and "bon@4=" in last  # the latest win rate, at the run's n=4
    assert not re.search(r"Epoch \d+/\d+", text), "Lightning's own per-epoch bar is shown"
    # every Lightning line once, no tips, no per-load bars, no Lightning deprecation noise
    assert text.count("GPU available") == 1 and text.count("TPU available") == 1
    assert "INFO: " not in text and "Tip:" not in text and "litlogger" not in text
    assert "Loading weights" not in text and "Writing model shards" not in text and "LeafSpec" not in text
    # numbers for reading; the end-of-run summary as before; the final-metrics log line short
    evals = [line for line in out.stdout.splitlines() if "eval @ iteration" in line]
    assert len(evals) == 2 and all("prompts=6" in line and "6.0000" not in line for line in evals)
    assert not re.search(r"=-0\.000\b", "\n".join(evals))
    assert "best-of-4 win rate" in out.stdout
    final = [line for line in out.stdout.splitlines() if "final metrics:" in line]
    assert len(final) == 1 and len(final[0]) < 300 and "final_metrics.json" in final[0]
