"""Faults end to end on the smoke models: SIGKILL, SIGTERM and SIGINT mid-training (`python train.py` in a
subprocess) followed by a resume end with exactly the metrics of an uninterrupted run; so does a SIGKILL during
or after the final evaluation, and extending a finished run; resuming a finished run changes nothing; a logger
failing mid-run costs no metric and is reported once. Runs that need no signal run in-process
(`infalign.trainer.inprocess`), which saves a Python start-up each."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import stop_started

from infalign.runtime.checkpoint_io import verify_checkpoint
from infalign.trainer.inprocess import run_in_process

REPO = Path(__file__).resolve().parents[1]
# 30 iterations (~0.1-0.3 s each here), a checkpoint after every one, an evaluation every 10 (3 in all, the last one
# the final evaluation; the first one well after the iterations the timed kill and stops below land in: a kill during
# an evaluation's file writes is another case); EXTENDED: a run of 20 of them (evaluated at 10 and 20), extended to 30
ITERATIONS, EVERY, EXTENDED = 30, 10, 20
ARGS = ["scale=smoke", "progress=false", "logger=none", "num_threads=1", f"rl.iterations={ITERATIONS}",
        f"eval.every={EVERY}", "checkpoint.every=1"]
VOLATILE = ("run_dir", "wall_seconds", "calibration_cache_hit")  # final_metrics.json fields that may differ
TIMING = ("train/time/", "train/throughput/")  # wall-clock columns of logs/metrics.csv


def start(session_cache, run_dir, *extra) -> subprocess.Popen:
    env = {**os.environ, "INFALIGN_CACHE": str(session_cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: stop_started


def wait_for_checkpoint(proc, ckpt: Path, newer_than: float = 0.0, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (ckpt.exists() and ckpt.stat().st_mtime > newer_than):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint appeared:\n{proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint within the timeout")
        time.sleep(0.02)


def iteration_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"] + 1


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise-equal final metrics, evaluation rows and training rows (every column but wall-clock timings)."""
    fa, fb = (json.loads((d / "final_metrics.json").read_text()) for d in (a, b))
    assert {k: v for k, v in fa.items() if k not in VOLATILE} == {k: v for k, v in fb.items() if k not in VOLATILE}
    assert (a / "eval_metrics.csv").read_text() == (b / "eval_metrics.csv").read_text()
    ra, rb = (list(csv.DictReader(open(d / "logs" / "metrics.csv"))) for d in (a, b))
    # two rows per iteration (its statistics; its learning rate, from LearningRateMonitor) and one per evaluation:
    # none lost, none twice
    assert len(ra) == len(rb) == 2 * ITERATIONS + 3
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if not k.startswith(TIMING)} == \
               {k: v for k, v in y.items() if not k.startswith(TIMING)}
    assert files_of(a / "policy") == files_of(b / "policy"), "policy/ differs"  # weights and tokenizer, byte for byte


def files_of(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), but those under a `skip` prefix."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


@pytest.fixture(scope="module")
def straight(session_cache, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("faults") / "straight"
    run_in_process([*ARGS, f"cache_root={session_cache}"], run_dir)
    return run_dir


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(session_cache, straight, tmp_path):
    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = start(session_cache, run_dir)
    wait_for_checkpoint(proc, ckpt)
    time.sleep(0.3)  # land somewhere inside a later iteration, or inside a checkpoint write
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final_metrics.json").exists(), "the run finished before the kill"
    verify_checkpoint(ckpt)  # whatever the kill interrupted, the checkpoint in place is whole
    assert 1 <= iteration_of(ckpt) < ITERATIONS
    run_in_process([*ARGS, "resume=auto", f"cache_root={session_cache}"], run_dir)  # auto: finds the checkpoint
    assert_same_run(straight, run_dir)
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"


def test_sigterm_and_sigint_stop_at_an_iteration_boundary_with_a_checkpoint(session_cache, straight, tmp_path):
    run_dir = tmp_path / "signalled"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    last_mtime = 0.0
    for sig, extra in ((signal.SIGTERM, []), (signal.SIGINT, ["resume=true"])):
        proc = start(session_cache, run_dir, *extra)
        wait_for_checkpoint(proc, ckpt, newer_than=last_mtime)  # this process has saved at least once
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, err[-3000:]  # non-zero: a supervisor sees the run did not finish
        assert f"{sig.name} received: stopped after iteration" in err
        assert f"hydra.run.dir={run_dir} resume=true" in err  # the message says how to continue
        assert not (run_dir / "final_metrics.json").exists()
        verify_checkpoint(ckpt)
        stopped_at = int(err.split("stopped after iteration ")[1].split(",")[0])
        assert iteration_of(ckpt) == stopped_at < ITERATIONS  # saved at the stop, not only at the last periodic save
        last_mtime = ckpt.stat().st_mtime
    run_in_process([*ARGS, "resume=true", f"cache_root={session_cache}"], run_dir)
    assert_same_run(straight, run_dir)


def test_logger_failing_mid_run_costs_no_metrics_and_warns_once(session_cache, tmp_path, caplog):
    run_dir = tmp_path / "flaky"
    with caplog.at_level(logging.WARNING, logger="infalign.runtime.loggers"):
        run_in_process([*ARGS[:4], "rl.iterations=6", "eval.every=2", "+logger._target_=fake_loggers.FailingLogger",
                        "+logger.fail_after=3", f"cache_root={session_cache}"], run_dir)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["iteration"] == 6
    assert [int(r["iteration"]) for r in csv.DictReader(open(run_dir / "eval_metrics.csv"))] == [2, 4, 6]
    assert len(list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))) == 2 * 6 + 3  # iterations (+ lr), evals
    assert caplog.text.count("logger FailingLogger failed in log_metrics") == 1, caplog.text
    assert "ConnectionError" in caplog.text and "switched off" in caplog.text


# ------------------------------------------------------------------------------ finished runs and the final evaluation
def test_resuming_a_finished_run_changes_nothing(session_cache, straight, tmp_path, monkeypatch, capsys):
    import shutil

    import infalign.trainer.pieces

    run_dir = tmp_path / "finished"
    shutil.copytree(straight, run_dir)
    results = files_of(run_dir)  # .hydra/ and train.log included: a command with nothing to do writes nothing

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded to resume a finished run")

    monkeypatch.setattr(infalign.trainer.pieces, "load_policy", no_model)  # the check comes before any model
    for mode in ("auto", "true"):
        final = run_in_process([*ARGS, f"resume={mode}", f"cache_root={session_cache}"], run_dir)
        assert "is already finished" in capsys.readouterr().out
        assert final["iteration"] == ITERATIONS and "eval/bon_win_rate@4" in final
        assert files_of(run_dir) == results  # byte for byte, nothing added


KILLS = ["eval:3", "finalize"]


@pytest.fixture(scope="module", autouse=True)
def killed_at_the_end_started(session_cache, tmp_path_factory):
    """Both deterministic kills below (a logger kills its own run at a fixed point, no timing involved), their
    commands started side by side with this module's first test, each in its own run directory: they run beside
    the tests before the one that reads them. kill_at -> (run directory, process)."""
    root = tmp_path_factory.mktemp("killed")
    procs = {kill_at: (root / kill_at.replace(":", "_"),
                       start(session_cache, root / kill_at.replace(":", "_"),
                             "+logger._target_=tests.fake_loggers.KillingLogger", f"+logger.kill_at={kill_at}"))
             for kill_at in KILLS}
    yield procs
    for _, proc in procs.values():  # if no test read them (a selection of the other tests): not left running
        stop_started(proc)


@pytest.fixture(scope="module")
def killed_at_the_end(killed_at_the_end_started) -> dict:
    """kill_at -> (run directory, exit status, stderr), once both commands ended."""
    out = {}
    for kill_at, (run_dir, proc) in killed_at_the_end_started.items():
        _, err = proc.communicate(timeout=600)
        out[kill_at] = (run_dir, proc.returncode, err)
    return out


@pytest.mark.parametrize("kill_at", KILLS)
def test_sigkill_during_or_after_the_final_evaluation_then_resume_finishes_it(session_cache, killed_at_the_end,
                                                                              straight, kill_at):
    """A deterministic SIGKILL (tests/fake_loggers.py KillingLogger): `eval:3` while the final (3rd) evaluation
    logs its metrics, its eval_metrics.csv row not yet written, the checkpoint in place the one after the last
    iteration's training; `finalize` after the final evaluation and the final checkpoint, before policy/ and
    final_metrics.json. The resume runs the evaluation, or takes it from the checkpoint, exactly once."""
    run_dir, returncode, err = killed_at_the_end[kill_at]
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert not (run_dir / "final_metrics.json").exists() and not (run_dir / "policy").exists()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    verify_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == ITERATIONS  # the final iteration
    assert ("WinRateCallback" in state["callbacks"]) == (kill_at == "finalize")  # holds the final evaluation
    evals = list(csv.DictReader(open(run_dir / "eval_metrics.csv")))
    assert [int(r["iteration"]) for r in evals] == [EVERY, 2 * EVERY, 3 * EVERY][:2 if kill_at == "eval:3" else 3]
    run_in_process([*ARGS, "resume=auto", f"cache_root={session_cache}"], run_dir)
    assert_same_run(straight, run_dir)
    again = files_of(run_dir)
    run_in_process([*ARGS, "resume=auto", f"cache_root={session_cache}"], run_dir)  # now finished: a no-op
    assert files_of(run_dir) == again


def test_extending_a_finished_run_continues_it_like_an_uninterrupted_run(session_cache, straight, tmp_path):
    run_dir = tmp_path / "extended"
    shorter = [a if not a.startswith("rl.iterations=") else f"rl.iterations={EXTENDED}" for a in ARGS]
    run_in_process([*shorter, f"cache_root={session_cache}"], run_dir)  # finished at 20, evaluated at 10 and 20
    assert json.loads((run_dir / "final_metrics.json").read_text())["iteration"] == EXTENDED
    run_in_process([*ARGS, "resume=true", f"cache_root={session_cache}"], run_dir)  # rl.iterations 20 -> 30
    # the final evaluation at 20 is the one an uninterrupted 30-iteration run makes there (eval.every=10)
    assert_same_run(straight, run_dir)
    history = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert [(h["from_iteration"], h["changes"], h["extensions"]) for h in history] == \
           [(EXTENDED, {}, {"rl.iterations": [EXTENDED, ITERATIONS]})]
    assert f"iterations: {EXTENDED}" in (run_dir / "run_config.yaml").read_text()  # the config the run started with
