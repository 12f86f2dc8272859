"""bench/phase_compare.py, its pure parts: reading a run's files into phase medians, the pair-by-pair ratio table.
No training: synthetic metrics.csv / final_metrics.json / manifest.json."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("phase_compare", REPO / "bench" / "phase_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pc = _load_script()

COLUMNS = ["epoch", "step", "eval/kl", "train/kl/k1", pc.TOKENS_COLUMN, *[f"train/time/{p}" for p in pc.PHASES]]


def _write_run(run_dir: Path, iterations: list[dict], cache_hit: bool = False) -> Path:
    """A run directory as train.py leaves it: logs/metrics.csv (one row per iteration, then the eval row),
    final_metrics.json naming the calibration cache, and that cache's manifest.json."""
    (run_dir / "logs").mkdir(parents=True)
    with open(run_dir / "logs" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for i, it in enumerate(iterations):
            w.writerow({"epoch": i, "step": i, "train/kl/k1": 0.1, pc.TOKENS_COLUMN: it["tok"],
                        **{f"train/time/{p}": it[p] for p in pc.PHASES}})
        w.writerow({"step": len(iterations), "eval/kl": 0.2})  # the final evaluation: no train/ columns
    cache = run_dir.parent / "cache" / "reference_samples" / "abc"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"build_seconds": 12.5, "meta": {"prompts": 18, "m": 8}}))
    (run_dir / "final_metrics.json").write_text(json.dumps(
        {"calibration_cache": str(cache), "calibration_cache_hit": cache_hit, "wall_seconds": 30.0}))
    return run_dir


def _iteration(scale: float, tok: float) -> dict:
    return {"generate": 1.0 * scale, "score": 0.5 * scale, "calibrate": 0.01 * scale, "logprobs": 0.2 * scale,
            "update": 0.3 * scale, "tok": tok}


def test_read_train_run_takes_medians_without_the_warm_up_iteration(tmp_path):
    # iteration 1 is a slow warm-up (x10); then scales 1, 3, 2: median 2
    its = [_iteration(10, 50.0), _iteration(1, 400.0), _iteration(3, 100.0), _iteration(2, 200.0)]
    stats = pc.read_train_run(_write_run(tmp_path / "run", its))
    assert stats["generate"] == pytest.approx(2.0)
    assert stats["score"] == pytest.approx(1.0)
    assert stats["calibrate"] == pytest.approx(0.02)
    assert stats["update"] == pytest.approx(0.6)
    assert stats["iteration_total"] == pytest.approx(2.01 * 2)  # median of the per-iteration sums
    assert stats["tokens_per_s"] == pytest.approx(200.0)
    assert stats["iterations_logged"] == 4
    assert stats["calibration_build_s"] == 12.5 and stats["calibration_cache_hit"] is False
    assert stats["run_reported_s"] == 30.0
    assert stats["per_iteration"]["generate"] == pytest.approx([10.0, 1.0, 3.0, 2.0])


def test_a_calibration_cache_hit_reports_no_build_time(tmp_path):
    stats = pc.read_train_run(_write_run(tmp_path / "run", [_iteration(1, 1.0)], cache_hit=True))
    assert stats["calibration_build_s"] is None
    assert stats["generate"] == 1.0  # one iteration: nothing to drop


def test_phases_logged_in_separate_rows_give_the_sum_of_the_medians():
    rows = [{"train/time/generate": "1", "train/time/score": "1", "train/time/calibrate": "0",
             "train/time/logprobs": "1"}, {"train/time/update": "2"}] * 2
    stats = pc.iteration_stats(rows)
    assert stats["update"] == 2.0
    assert stats["iteration_total"] == pytest.approx(5.0)


def test_build_summary_numbers():
    summary = {"wall_seconds": 60.0, "torch_threads": 2, "stages": {
        "policy": {"seconds": 40.0, "cache_hit": False, "meta": {"val/ppl": 31.5}},
        "reward": {"seconds": 15.0, "cache_hit": False, "meta": {"test_acc": 0.58, "n_test": 100}}}}
    got = pc.read_build_summary(summary)
    assert (got["sft_s"], got["reward_s"], got["models_s"]) == (40.0, 15.0, 55.0)
    assert (got["val_ppl"], got["reward_test_acc"]) == (31.5, 0.58)


def test_model_overrides_are_those_build_yaml_shares():
    assert pc.model_overrides(["scale=smoke", "n=4", "model.gpt2.n_layer=2", "+reward.x=1", "rl.k=8", "data=hh_rlhf",
                               "modelx=1"]) == ["scale=smoke", "model.gpt2.n_layer=2", "+reward.x=1", "data=hh_rlhf"]


def test_ratios_are_taken_pair_by_pair():
    # pair 1 ran in a busy period (both slow), pair 2 in a quiet one: the per-pair ratios are 0.5 and 0.8,
    # while the ratio of the two trees' medians would be (6+0.8)/2 / ((10+1)/2) = 0.618
    pairs = [{"before": {"generate": 10.0, "tokens_per_s": 100.0}, "after": {"generate": 5.0, "tokens_per_s": 300.0}},
             {"before": {"generate": 1.0, "tokens_per_s": 1000.0}, "after": {"generate": 0.8}}]
    rows = [("generate", "generate"), ("tokens_per_s", "tokens/s"), ("update", "update")]
    table = {r["key"]: r for r in pc.compare(pairs, rows)}
    gen = table["generate"]
    assert (gen["before"], gen["after"]) == (pytest.approx(5.5), pytest.approx(2.9))
    assert gen["ratio"] == pytest.approx(0.65) and gen["pairs"] == 2
    assert (gen["ratio_min"], gen["ratio_max"]) == (pytest.approx(0.5), pytest.approx(0.8))
    tok = table["tokens_per_s"]  # the after value of pair 2 is missing: one ratio
    assert tok["ratio"] == pytest.approx(3.0) and tok["pairs"] == 1
    assert "update" not in table  # no data at all: no row

    md = pc.markdown_table(pc.compare(pairs, rows))
    lines = md.splitlines()
    assert lines[0].startswith("| phase | before, median | after, median | after / before")
    assert lines[2] == "| generate | 5.50 | 2.90 | 0.650 | 0.500-0.800 | 2 |"


def test_zero_before_gives_no_ratio():
    pairs = [{"before": {"calibrate": 0.0}, "after": {"calibrate": 0.001}}]
    (row,) = pc.compare(pairs, [("calibrate", "calibrate")])
    assert row["ratio"] is None and row["pairs"] == 0
    assert "| calibrate | 0.00 | 0.00100 | n/a | n/a | 0 |" in pc.markdown_table([row])
