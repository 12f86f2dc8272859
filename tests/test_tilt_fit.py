"""The tilt-fit diagnostic (infalign.study.tilt_fit, issue 30 item 3): the regression on exact tilts of a discrete
response set, and end to end on a smoke run's own files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from infalign.core.calibration import leave_one_out_calibrated
from infalign.core.transforms import BoNExpTransform, IdentityTransform, WoNExpTransform
from infalign.study.tilt_fit import read_tilt_fit, tilt_fit
from infalign.study.tilt_regression import fit_slope

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
P, M, BETA = 12, 16, 0.1


def discrete_set(seed: int = 0, transform=None):
    """P prompts, each with M responses (a discrete response set): the reference's log-probs over it, the
    responses' rewards, their leave-one-out C and Phi(C)."""
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(P, M, generator=g, dtype=torch.float64), dim=1)
    rewards = torch.randn(P, M, generator=g, dtype=torch.float64)
    c = leave_one_out_calibrated(rewards)
    phi = (transform or BoNExpTransform(10.0))(c)
    ids = np.repeat([f"p{i}" for i in range(P)], M)
    return log_ref, c, phi, ids


def tilt(log_ref, score):
    """log pi of pi ∝ pi_ref exp(score) over each prompt's response set (normalised: log Z differs per prompt)."""
    return torch.log_softmax(log_ref + score, dim=1)


def fit(logratio, phi, c, ids):
    return fit_slope(logratio.numpy().ravel(), (phi / BETA).numpy().ravel(), ids, (c / BETA).numpy().ravel())


def test_exact_tilt_has_slope_one_and_the_transforms_shape():
    log_ref, c, phi, ids = discrete_set()
    out = fit(tilt(log_ref, phi / BETA) - log_ref, phi, c, ids)
    assert out["slope"] == pytest.approx(1.0, abs=1e-9)
    assert out["r2"] == pytest.approx(1.0, abs=1e-9)
    assert out["shape"] == pytest.approx(1.0, abs=1e-9)
    assert out["shape_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert out["prompts"] == P and out["samples"] == P * M
    assert all(r["slope"] == pytest.approx(1.0, abs=1e-9) for r in out["per_prompt"])
    assert out["slope_se"] < 1e-9


def test_reference_has_slope_zero():
    log_ref, c, phi, ids = discrete_set()
    out = fit(log_ref - log_ref, phi, c, ids)
    assert out["slope"] == pytest.approx(0.0, abs=1e-12)
    assert out["shape"] == pytest.approx(0.0, abs=1e-12)
    assert out["logratio_mean"] == 0.0


def test_scaled_tilt_and_identity_shaped_policy():
    """A tilt at twice the beta: slope and shape 1/2, shape_ratio 1. A calibrated-RLHF policy (log-ratio linear in
    C): a positive slope on the bon_exp Phi, but shape 0: it does not follow the convexity."""
    log_ref, c, phi, ids = discrete_set(1)
    half = fit(tilt(log_ref, phi / (2 * BETA)) - log_ref, phi, c, ids)
    assert half["slope"] == pytest.approx(0.5, abs=1e-9) and half["shape"] == pytest.approx(0.5, abs=1e-9)
    assert half["shape_ratio"] == pytest.approx(1.0, abs=1e-9)
    linear = fit(tilt(log_ref, 3 * c / BETA) - log_ref, phi, c, ids)
    assert linear["slope"] > 0.5  # C and the convex Phi are correlated...
    assert linear["shape"] == pytest.approx(0.0, abs=1e-9)  # ...but the policy has none of Phi's curvature
    assert linear["shape_ratio"] == pytest.approx(0.0, abs=1e-9)
    assert linear["r2"] < 0.99


def test_concave_transform_and_linear_transform():
    log_ref, c, phi, ids = discrete_set(2, WoNExpTransform(8.0))
    out = fit(tilt(log_ref, phi / BETA) - log_ref, phi, c, ids)
    assert out["slope"] == pytest.approx(1.0, abs=1e-9) and out["shape"] == pytest.approx(1.0, abs=1e-9)
    log_ref, c, phi, ids = discrete_set(3, IdentityTransform())
    out = fit(tilt(log_ref, phi / BETA) - log_ref, phi, c, ids)
    assert out["slope"] == pytest.approx(1.0, abs=1e-9)
    assert out["shape"] is None and out["shape_ratio"] is None  # no shape beyond the identity's


def test_noisy_tilt_slope_within_its_standard_error():
    """Drift the reward does not see (noise in the log-ratio): the slope stays unbiased and its clustered s.e.
    covers the truth; R^2 drops below 1."""
    rng = np.random.default_rng(5)
    log_ref, c, phi, ids = discrete_set(4)
    zs = []
    for _ in range(40):
        noise = torch.from_numpy(rng.normal(0, 2.0, size=(P, M)))
        out = fit(tilt(log_ref, 0.7 * phi / BETA + noise) - log_ref, phi, c, ids)
        zs.append((out["slope"] - 0.7) / out["slope_se"])
        assert 0 < out["r2"] < 1
    assert abs(np.mean(zs)) < 0.6 and 0.5 < np.std(zs) < 1.6


def test_fit_slope_refuses_bad_input():
    with pytest.raises(ValueError):
        fit_slope([0.0, 1.0], [0.0], ["a", "a"])
    with pytest.raises(ValueError):
        fit_slope([0.0, float("nan")], [0.0, 1.0], ["a", "a"])
    out = fit_slope([0.0, 1.0], [2.0, 2.0], ["a", "a"])  # no variation in Phi within the prompt
    assert out["slope"] is None and out["per_prompt"][0]["slope"] is None


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def smoke_run(run_train, session_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tilt_fit") / "run"
    run_train("scale=smoke", "logger=none", "progress=false", "rl.iterations=2", "num_threads=1",
              f"hydra.run.dir={run_dir}")
    return run_dir


def test_tilt_fit_on_a_smoke_run(smoke_run, session_cache):
    out = tilt_fit(smoke_run, cache_root=session_cache, prompts="held_out")
    for key in ("slope", "slope_se", "slope_se_simple", "r2", "shape", "shape_se", "logratio_mean"):
        assert np.isfinite(out[key]), key
    assert out["prompts"] == 6 and out["samples_per_prompt"] == 8 and out["source"] == "calibration_cache"
    assert out["transform"] == "bon_exp" and out["t"] > 0
    assert read_tilt_fit(smoke_run)["slope"] == out["slope"]  # written, and read back as the study reads it
    train = tilt_fit(smoke_run, cache_root=session_cache, prompts="train", max_prompts=4, max_samples=5)
    assert train["prompts"] == 4 and train["samples"] == 20 and np.isfinite(train["slope"])
    stored = json.loads((smoke_run / "tilt_fit.json").read_text())
    assert set(stored) == {"held_out", "train"}  # each prompt set keeps its own entry


def test_the_reference_as_policy_gives_slope_zero(smoke_run, session_cache, tmp_path):
    """The run's saved policy replaced by the reference's own weights: every log-ratio is exactly 0, so the
    pipeline (token ids, log-probs, the pairing of samples with C) adds nothing of its own."""
    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.study.tilt_fit import _run_config

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = _run_config(run, session_cache)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=load_partitions(cfg.data),
                                       progress=False)
    shutil.rmtree(run / "policy")
    (run / "tilt_fit.json").unlink(missing_ok=True)
    reference.save_pretrained(run / "policy", safe_serialization=True)
    out = tilt_fit(run, cache_root=session_cache, write=False)
    assert out["logratio_mean"] == 0.0 and out["slope"] == 0.0
    assert not (run / "tilt_fit.json").exists()  # write=False


def test_cli_prints_one_json_line_and_refuses_a_non_run(smoke_run, session_cache, tmp_path):
    env = {**os.environ, "INFALIGN_CACHE": str(session_cache)}
    cmd = [sys.executable, "-m", "infalign.study.tilt_fit", str(smoke_run), "--max-prompts", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["prompts"] == 3 and "per_prompt" not in lines[0]
    bad = subprocess.run([sys.executable, "-m", "infalign.study.tilt_fit", str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "final_metrics.json" in bad.stderr


# ------------------------------------------------------------------------------------------------ study tables
def test_study_tables_carry_the_tilt_slope_when_a_member_has_one(tmp_path):
    """tilt_slope / tilt_shape in study_runs.csv and solver_efficiency.csv: each member's tilt_fit.json (held-out
    entry), NaN for a member without one."""
    import csv
    import math

    from test_study import fake_final

    from infalign.study import analyze_sweep, write_study

    slopes = {0: 0.4, 1: 0.6}
    for seed in (0, 1, 2):
        d = tmp_path / str(seed)
        (d / ".hydra").mkdir(parents=True)
        final = fake_final("calibrated", "identity", 0.3, seed, 0.2, 0.6, 0.65, 0.55)
        final.update(solver="rloo", calibration_m=16)
        (d / ".hydra" / "config.yaml").write_text(json.dumps({
            "n": 4, "beta": 0.3, "transform": {"_target_": "infalign.core.transforms.IdentityTransform"},
            "calibration": {"m": 16}}))
        (d / "final_metrics.json").write_text(json.dumps(final))
        if seed in slopes:
            (d / "tilt_fit.json").write_text(json.dumps({"held_out": {"slope": slopes[seed], "shape": None},
                                                         "train": {"slope": 9.0}}))
    runs = {r["seed"]: r for r in analyze_sweep(tmp_path).runs}
    assert runs[0]["tilt_slope"] == 0.4 and runs[1]["tilt_slope"] == 0.6 and math.isnan(runs[2]["tilt_slope"])
    assert math.isnan(runs[0]["tilt_shape"])  # identity: no shape beyond the identity's
    paths = write_study(tmp_path)
    row = next(csv.DictReader(open(paths["efficiency"])))
    assert float(row["tilt_slope"]) == pytest.approx(0.5)  # the mean over the seeds that have one
    assert "tilt_slope" in next(csv.DictReader(open(paths["runs"])))


def test_a_run_recorded_before_the_prompt_keys_moved_is_read(tmp_path):
    """run_config.yaml from before issue 28 (calibration.train_prompts ...): read with the keys at data.*."""
    from omegaconf import OmegaConf

    from infalign.study.tilt_fit import _run_config

    old = {"config": {"data": {"max_prompt_tokens": 8}, "calibration": {"m": 4, "train_prompts": 12,
                                                                         "eval_prompts": 6, "eval_partition": "test"},
                      "solver": "rloo", "cache_root": "/x"}}
    (tmp_path / "run_config.yaml").write_text(OmegaConf.to_yaml(old))
    cfg = _run_config(tmp_path, cache_root=tmp_path / "cache")
    assert (cfg.data.train_prompts, cfg.data.eval_prompts, cfg.data.eval_partition) == (12, 6, "test")
    assert "train_prompts" not in cfg.calibration and cfg.cache_root == str(tmp_path / "cache")
