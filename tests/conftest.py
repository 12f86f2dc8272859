import os
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


@pytest.fixture(scope="session")
def run_train(session_cache):
    """Run `python train.py ...` in a subprocess with the session cache; returns the CompletedProcess."""

    def _run(*overrides: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "INFALIGN_CACHE": str(session_cache), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, str(REPO / "train.py"), *overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or REPO)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        return out

    return _run
