import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach a hub and never log to W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One model/calibration cache for the whole test session (the smoke models are built once)."""
    return tmp_path_factory.mktemp("infalign-cache")


def _train_command(session_cache: Path, overrides) -> tuple[list[str], dict]:
    env = {**os.environ, "INFALIGN_CACHE": str(session_cache), "PYTHONUNBUFFERED": "1"}
    return [sys.executable, str(REPO / "train.py"), *overrides], env


@pytest.fixture(scope="session")
def run_train(session_cache):
    """Run `python train.py ...` in a subprocess with the session cache; returns the CompletedProcess."""

    def _run(*overrides: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        cmd, env = _train_command(session_cache, overrides)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or REPO)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        return out

    return _run


@pytest.fixture(scope="session")
def start_train(session_cache):
    """Start `python train.py ...` as `run_train` runs it, without waiting (the test does something else meanwhile);
    returns the Popen (text pipes: `communicate()`). Its own process group: `stop_started` ends it and any process
    it started (a DDP run's other ranks)."""

    def _start(*overrides: str, cwd: Path | None = None) -> subprocess.Popen:
        cmd, env = _train_command(session_cache, overrides)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=cwd or REPO, start_new_session=True)

    return _start


def finish_started(proc: subprocess.Popen, what: str, timeout: float = 600) -> tuple[str, str]:
    """Wait for a `start_train` command and require it to have succeeded; returns (stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return out, err


def stop_started(proc: subprocess.Popen) -> None:
    """A fixture's teardown for a `start_train` command no test waited for (only other tests were selected):
    its process group is killed, not left running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def study_sweep(study: str):
    """A study preset's sweep (`hydra.sweeper.params`) as Hydra composes it: a study may take it from the study
    it composes (conf/study/shape_lr.yaml: study=shape's)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", [f"study={study}"], return_hydra_config=True).hydra.sweeper.params


# A finished 2-iteration smoke run (the default method bon_exp, beta 0.1; no evaluation but the final one), made in
# process once per session. Tests read it, or copy it (shutil.copytree) to resume or change it: never write into it.
FINISHED_SMOKE_ARGS = ["scale=smoke", "progress=false", "logger=none", "num_threads=1", "rl.iterations=2", "eval.every=0"]


@pytest.fixture(scope="session")
def finished_smoke_run(session_cache, tmp_path_factory) -> Path:
    from infalign.trainer.inprocess import run_in_process

    run_dir = tmp_path_factory.mktemp("finished_smoke") / "run"
    run_in_process([*FINISHED_SMOKE_ARGS, f"cache_root={session_cache}"], run_dir)
    return run_dir

