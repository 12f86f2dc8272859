"""The held-in evaluation (`eval.held_in_prompts`): training prompts evaluated beside the held-out ones, logged as
`eval_held_in/*` and `eval_per_prompt_held_in.csv`, from a random stream of its own, so that the held-out numbers
are bit for bit those of the same run without it; and its range rule."""

import csv
import json
import sys

import pytest
from hydra import compose, initialize_config_dir

from infalign.config.check import check_config
from infalign.runtime.paths import conf_dir

SMOKE = ["scale=smoke", "progress=false", "logger=none", "num_threads=1", "rl.iterations=2", "eval.every=1"]
HELD_IN = 4


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(session_cache, tmp_path_factory):
    """The same smoke run without and with 4 held-in prompts (in process: the config check and the run
    `python train.py` makes)."""
    from infalign.trainer.inprocess import run_in_process

    out = {}
    for held_in in (0, HELD_IN):
        run_dir = tmp_path_factory.mktemp(f"held_in_{held_in}")
        run_in_process([*SMOKE, f"eval.held_in_prompts={held_in}", f"cache_root={session_cache}"], run_dir)
        out[held_in] = run_dir
    return out


def test_the_held_in_prompts_are_evaluated_and_written_beside_the_held_out_ones(runs):
    run_dir = runs[HELD_IN]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    held_out = sorted(k.split("/", 1)[1] for k in final if k.startswith("eval/"))
    held_in = sorted(k.split("/", 1)[1] for k in final if k.startswith("eval_held_in/"))
    assert held_in == held_out  # every metric, under the parallel prefix
    for name in ("bon_win_rate@4", "won_win_rate@4", "kl", "kl_calibrated", "response_tokens",
                 "reference_response_tokens"):
        assert isinstance(final[f"eval_held_in/{name}"], float), name
    assert final["eval_held_in/prompts"] == HELD_IN and final["eval/prompts"] == 6
    # eval_metrics.csv: the same row, extra columns (one row per evaluation: iterations 1 and 2)
    table = rows(run_dir / "eval_metrics.csv")
    assert [r["iteration"] for r in table] == ["1", "2"]
    assert all(r["eval_held_in/bon_win_rate@4"] != "" and r["eval/bon_win_rate@4"] != "" for r in table)
    assert float(table[-1]["eval_held_in/kl"]) == pytest.approx(final["eval_held_in/kl"])
    # every logger gets them (logs/metrics.csv: the CSV logger), at the evaluation's step
    logged = rows(run_dir / "logs" / "metrics.csv")
    assert sum(r.get("eval_held_in/bon_win_rate@4", "") != "" for r in logged) == 2
    # per prompt: one row per held-in prompt, training prompts, none of them held out
    per_prompt = rows(run_dir / "eval_per_prompt_held_in.csv")
    assert len(per_prompt) == HELD_IN
    held_out_ids = {r["prompt_id"] for r in rows(run_dir / "eval_per_prompt.csv")}
    assert not held_out_ids & {r["prompt_id"] for r in per_prompt}
    assert list(per_prompt[0]) == list(rows(run_dir / "eval_per_prompt.csv")[0])
    mean = sum(float(r["bon_win_rate@4"]) for r in per_prompt) / HELD_IN
    assert mean == pytest.approx(final["eval_held_in/bon_win_rate@4"], abs=1e-9)
    print("\nheld-in vs held-out: " + ", ".join(
        f"{k}: {final[f'eval_held_in/{k}']:.4f} vs {final[f'eval/{k}']:.4f}"
        for k in ("bon_win_rate@1", "bon_win_rate@4", "won_win_rate@4", "kl", "kl_calibrated", "response_tokens")),
        file=sys.stderr)


def test_the_held_out_numbers_are_those_of_the_run_without_held_in_prompts(runs):
    without, with_ = (json.loads((runs[h] / "final_metrics.json").read_text()) for h in (0, HELD_IN))
    assert not any(k.startswith("eval_held_in/") for k in without)
    assert not (runs[0] / "eval_per_prompt_held_in.csv").exists()
    compared = [k for k in without if k.startswith("eval/")]
    assert len(compared) > 10
    assert {k: with_[k] for k in compared} == {k: without[k] for k in compared}  # bit for bit, not approx
    # every evaluation's row, and the per-prompt rows, as written
    a, b = rows(runs[0] / "eval_metrics.csv"), rows(runs[HELD_IN] / "eval_metrics.csv")
    assert [{k: v for k, v in r.items() if not k.startswith("eval_held_in/")} for r in b] == a
    assert rows(runs[0] / "eval_per_prompt.csv") == rows(runs[HELD_IN] / "eval_per_prompt.csv")


def test_more_held_in_prompts_than_training_prompts_are_refused_in_one_line(run_train, tmp_path):
    out = run_train("scale=smoke", "logger=none", "eval.held_in_prompts=13", f"hydra.run.dir={tmp_path / 'run'}",
                    check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "eval.held_in_prompts=13 exceeds data.train_prompts=12" in lines[0]
    assert not (tmp_path / "run" / "final_metrics.json").exists()
    # all of them is fine (the schema and the rules between keys, without a run)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["scale=smoke", "eval.held_in_prompts=12"])
    check_config(cfg, overrides=[])
