"""Resume checks the config: the checkpoint records the run's resolved config, and a resume that changes the
experiment is refused before any model is loaded, listing the keys, unless resume_allow_changes=true; raising
rl.iterations is always allowed. Both configs are kept (run_config.yaml, resume_history.jsonl). In-process runs
of the smoke preset (`infalign.trainer.inprocess`)."""

import json
import shutil

import pytest
import torch
from conftest import FINISHED_SMOKE_ARGS as ARGS  # the run `finished` (2 iterations, eval.every=0) was made with them

import infalign.trainer.pieces
from infalign.trainer.inprocess import run_in_process


def files_of(root):
    """Every file under `root`, .hydra/ and train.log included (written only by a command that runs there)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(finished_smoke_run):
    """A finished 2-iteration smoke run (bon_exp, beta 0.1), shared by the session (tests/conftest.py): copied
    (`copy_of`) before any command runs in it."""
    return finished_smoke_run


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config check")

    monkeypatch.setattr(infalign.trainer.pieces, "load_policy", refuse)


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_the_checkpoint_and_run_config_yaml_record_the_config(finished):
    record = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["run_config"]
    assert record["config"]["beta"] == 0.1 and record["config"]["rl"]["iterations"] == 2
    assert record["choices"]["transform"] == "bon_exp"
    text = (finished / "run_config.yaml").read_text()
    assert text.startswith("# The resolved config this run started with") and "beta: 0.1" in text
    assert not (finished / "resume_history.jsonl").exists()  # never resumed


@pytest.mark.parametrize("overrides, lines", [
    (["beta=0.5", "transform=won_exp"], ["beta: 0.1 -> 0.5", "choices.transform: bon_exp -> won_exp",
                                         "transform._target_: infalign.theory.factories.bon_exp -> "
                                         "infalign.theory.factories.won_exp", "transform.beta: 0.1 -> 0.5"]),
    (["rl.iterations=1"], ["rl.iterations: 2 -> 1"]),  # fewer iterations is no extension
    (["seed=1", "optimizer.lr=0.01"], ["seed: 0 -> 1", "optimizer.lr: 0.0001 -> 0.01"]),
])
def test_a_changed_experiment_is_refused_before_any_model_listing_the_keys(session_cache, finished, tmp_path, no_model,
                                                                           overrides, lines):
    run_dir = copy_of(finished, tmp_path)
    before = files_of(run_dir)
    with pytest.raises(ValueError, match="resume refused") as refused:
        run_in_process([*ARGS, *overrides, "resume=true", f"cache_root={session_cache}"], run_dir)
    message = str(refused.value)
    assert "\n" not in message  # one line, as train.py prints it
    for line in lines:
        assert line in message, message
    assert message.count(" -> ") == len(lines) + 1  # those keys only (+ the one in "old -> new")
    assert "resume_allow_changes=true" in message and "run_config.yaml" in message  # how to proceed
    assert files_of(run_dir) == before


def test_settings_outside_the_experiment_may_change(session_cache, finished, tmp_path, no_model):
    run_dir = copy_of(finished, tmp_path)
    before = files_of(run_dir)
    final = run_in_process([*ARGS, "eval.k=16", "checkpoint.every=5", "progress=true", "resume=true",
                            f"cache_root={session_cache}"], run_dir)  # finished: accepted, nothing to do
    assert final["iteration"] == 2 and files_of(run_dir) == before


def test_changes_allowed_explicitly_are_applied_and_both_configs_kept(session_cache, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    final = run_in_process([*ARGS, "rl.iterations=3", "beta=0.5", "resume_allow_changes=true", "resume=true",
                            f"cache_root={session_cache}"], run_dir)
    assert final["iteration"] == 3 and final["beta"] == 0.5
    original = (run_dir / "run_config.yaml").read_text()
    assert original == (finished / "run_config.yaml").read_text()  # never overwritten
    [entry] = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert entry["from_iteration"] == 2 and entry["resume_allow_changes"] is True and entry["config_checked"]
    assert entry["changes"] == {"beta": [0.1, 0.5], "transform.beta": [0.1, 0.5]}
    assert entry["extensions"] == {"rl.iterations": [2, 3]}
    assert "beta=0.5" in entry["overrides"]
    record = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["run_config"]
    assert record["config"]["beta"] == 0.5  # the checkpoint records what trained it last
    # so the old beta is now the change, and the new one continues without the flag
    with pytest.raises(ValueError, match=r"(?s)resume refused.*beta: 0\.5 -> 0\.1"):
        run_in_process([*ARGS, "rl.iterations=3", "resume=true", f"cache_root={session_cache}"], run_dir)
    before = files_of(run_dir)
    run_in_process([*ARGS, "rl.iterations=3", "beta=0.5", "resume=true", f"cache_root={session_cache}"], run_dir)
    assert files_of(run_dir) == before  # finished: nothing to do, nothing recorded


def test_a_resume_clears_the_temp_files_a_killed_write_left_in_the_run(finished, tmp_path):
    """A kill during an atomic write (an evaluation's files, the metrics log, a checkpoint) leaves its temp file;
    the resume's start removes them wherever the run writes, and leaves the outputs themselves alone."""
    from infalign.trainer.resume import resolve_resume

    run = copy_of(finished, tmp_path)
    stale = [run / ".eval_samples.jsonl.ab12.tmp", run / "logs" / ".metrics.csv.cd34.tmp",
             run / "checkpoints" / ".last.ckpt.ef56.tmp"]
    for path in stale:
        path.write_text("half-written")
    assert resolve_resume(run, True, False) == run / "checkpoints" / "last.ckpt"
    assert not any(path.exists() for path in stale)
    assert (run / "final_metrics.json").is_file() and (run / "logs" / "metrics.csv").is_file()
