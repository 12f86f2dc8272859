"""End to end: `python train.py scale=smoke` and friends, on the seconds-sized smoke scale (runs that only need
what the command runs, in process: `infalign.trainer.inprocess`)."""

import csv
import json
import math
import shutil

import pytest
import torch
from conftest import FINISHED_SMOKE_ARGS, finish_started, stop_started
from hydra import compose, initialize_config_dir

from infalign.config.check import check_config
from infalign.runtime.paths import conf_dir

SMOKE = ["scale=smoke", "progress=false"]


def read_final(run_dir):
    return json.loads((run_dir / "final_metrics.json").read_text())


def test_a_method_preset_runs_at_the_smoke_scale(session_cache, tmp_path):
    """`method=<name> scale=<name>`: the groups compose (the method picks transform and calibrator, the scale the
    sizes), and final_metrics.json records the method preset's name. In process: the config check and the run
    `python train.py method=<name> scale=smoke ...` makes."""
    from infalign.trainer.inprocess import run_in_process

    args = ["scale=smoke", "logger=none", "progress=false", "rl.iterations=1", "eval.every=0",
            f"cache_root={session_cache}"]
    run_in_process(["method=bon_exp", *args], tmp_path / "bon_exp")
    final = read_final(tmp_path / "bon_exp")
    assert final["method"] == "bon_exp" and final["transform"] == "bon_exp" and final["calibrator"] == "empirical"
    assert final["iteration"] == 1 and final["eval/prompts"] == 6  # smoke-sized: data.eval_prompts=6
    assert final["t_auto"] is True  # bon_exp.yaml: t: auto, chosen for n
    # a method named otherwise than its transform: the record is the preset's name
    run_in_process(["method=calibrated", *args], tmp_path / "calibrated")
    final = read_final(tmp_path / "calibrated")
    assert final["method"] == "calibrated" and final["transform"] == "identity" and final["eval/prompts"] == 6


def test_multirun_over_n_trains_for_each_n_and_shares_the_calibration_cache(run_train, tmp_path):
    """`transform=bon_exp n=2,4`: t is chosen for each member's n (t: auto by default), so the members train
    different policies; both use one calibration cache, and the sweep summary lists both."""
    from safetensors.torch import load_file

    sweep = tmp_path / "sweep"
    out = run_train("-m", *SMOKE, "logger=none", "transform=bon_exp", "n=2,4", "rl.iterations=2",
                    f"hydra.sweep.dir={sweep}")
    finals = [read_final(sweep / str(i)) for i in (0, 1)]
    assert [f["n"] for f in finals] == [2, 4] and all(f["t_auto"] for f in finals)
    assert finals[0]["t"] != finals[1]["t"]  # best-of-2 and best-of-4 ask for different t
    assert f"(t={finals[1]['t']:.4g}, auto for n=4)" in out.stdout  # the summary says which t trained
    weights = [load_file(str(sweep / str(i) / "policy" / "model.safetensors")) for i in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "n did not reach training"
    assert finals[0]["eval/kl"] != finals[1]["eval/kl"]
    assert finals[0]["calibration_cache"] == finals[1]["calibration_cache"]
    assert finals[1]["calibration_cache_hit"] is True  # the second member generated no reference samples
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert len(rows) == 2
    assert (sweep / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_and_matches_an_uninterrupted_run(run_train, start_train, finished_smoke_run,
                                                           session_cache, tmp_path):
    """A finished 2-iteration run (tests/conftest.py, copied) continued to 3 iterations by `python train.py ...
    resume=true` ends as the uninterrupted 3-iteration run (made in process: what train.py runs)."""
    from infalign.trainer.inprocess import run_in_process

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = FINISHED_SMOKE_ARGS  # those of the finished run: logger=none, eval.every=0, num_threads=1
    shutil.copytree(finished_smoke_run, resumed)
    assert read_final(resumed)["iteration"] == 2
    refusing = start_train(*args, "rl.iterations=3", f"hydra.run.dir={resumed}")  # meanwhile, the straight run:
    run_in_process([*args, "rl.iterations=3", f"cache_root={session_cache}"], straight)
    _, err = refusing.communicate(timeout=600)
    assert refusing.returncode != 0 and "resume=true" in err, err[-3000:]  # never clobbers a run silently
    run_train(*args, "rl.iterations=3", "resume=true", f"hydra.run.dir={resumed}")
    a, b = read_final(straight), read_final(resumed)
    assert b["step"] == a["step"] == 6
    for key in ("eval/kl", "eval/bon_win_rate@4", "eval/won_win_rate@4", "eval/reward_raw"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


@pytest.fixture(scope="module", autouse=True)
def smoke_run_started(start_train, tmp_path_factory):
    """`python train.py scale=smoke logger=wandb`, test_smoke_run_end_to_end's run: started with this module's
    first test, it runs beside the tests before that one (their runs are others)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = start_train(*SMOKE, "logger=wandb", f"hydra.run.dir={run_dir}")
    yield run_dir, proc
    stop_started(proc)  # if no test read it (a selection of the other tests)


def test_smoke_run_end_to_end(smoke_run_started):
    run_dir, proc = smoke_run_started
    out, err = finish_started(proc, "the smoke run")
    final = read_final(run_dir)
    for n in (1, 2, 4):  # eval.ns of the smoke scale, with the run's n=4
        for mode in ("bon", "won"):
            for suffix in ("", "_se"):
                assert math.isfinite(final[f"eval/{mode}_win_rate@{n}{suffix}"])
    assert math.isfinite(final["eval/kl"]) and math.isfinite(final["eval/reward_calibrated"])
    assert final["transform"] == "bon_exp" and final["n"] == 4 and final["iteration"] == 3
    rows = list(csv.DictReader(open(run_dir / "eval_metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [2, 3]  # every 2 iterations, and at the end
    logged = open(run_dir / "logs" / "metrics.csv").readline()
    for key in ("train/policy/loss", "train/kl/k1", "train/kl/k3", "train/reward/raw", "train/reward/calibrated",
                "train/reward/transformed", "train/policy/entropy", "train/policy/response_length"):
        assert key in logged
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert "best-of-4 win rate" in out  # the end-of-run summary
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy")  # loads directly with transformers
    assert (run_dir / "policy" / "model.safetensors").exists() and policy.config.n_layer == 1
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")  # plain data
    assert not [k for k in ckpt["state_dict"] if k.startswith("reference.")], "frozen reference saved in checkpoint"
    assert ckpt["global_step"] == 3 * 2  # 3 iterations x (4 prompts x k=4 / minibatch 8) optimizer steps


def compose_train(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize(
    "override, match",
    [
        ("n=0", "n must be a positive integer .*got 0"),
        ("n=2.5", "positive integer"),
        ("beta=0", "beta"),
        ("beta=-1", "beta"),
        ("calibration.m=2", "calibration.m=2 is below N=8"),
        ("rl.k=1", "rl.k must be an integer >= 2"),
        ("generation.temperature=0.7", "sample from the policy itself"),  # generation.temperature must be 1.0
        ("transform.t=0", None),
    ],
)
def test_bad_config_is_refused_before_any_model(override, match):
    cfg = compose_train(override)
    if match is None:  # transform parameters are checked when the transform is built, also before models
        from hydra.utils import instantiate

        with pytest.raises(Exception, match="`t` must be a positive"):
            instantiate(cfg.transform)
        return
    with pytest.raises(ValueError, match=match):
        check_config(cfg)


def test_unknown_transform_fails_fast_with_the_options(run_train, tmp_path):
    out = run_train("transform=bon_expp", f"hydra.run.dir={tmp_path}", check=False)
    assert out.returncode != 0
    assert "bon_expp" in out.stderr and "bon_exp" in out.stderr and "Available options" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_help_and_cfg_job_work(run_train):
    out = run_train("--cfg", "job", "transform=won_exp", "n=8")
    assert "won_exp" in out.stdout.lower() or "WoNExpTransform" in out.stdout
    assert "'n': 8" in out.stdout  # YAML quotes the key n
    assert "transform: bon_exp" in run_train("--help").stdout
