"""A damaged member is named and skipped by the study, never archived; the study's command lines refuse a
directory with no finished run in one line (issue 27, item 4)."""

import csv
import json
import logging
import math
import subprocess
import sys

import pytest

from infalign.study.__main__ import main
from infalign.study.analysis import analyze_sweep
from infalign.study.runs import collect_runs


def member(sweep, name, seed, solver="rloo", per_prompt=None):
    """A finished raw-reward member: config, per-prompt table (4 prompts), final metrics."""
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(json.dumps({"n": 4, "beta": 1.0, "transform": {
        "_target_": "infalign.core.transforms.RawTransform"}}))
    rows = per_prompt or [[f"p{j}", 0.6 + 0.01 * j + 0.02 * seed, 0.7] for j in range(4)]
    with open(d / "eval_per_prompt.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt_id", "bon_win_rate@1", "bon_win_rate@4"], *rows])
    final = {"method": "raw", "transform": "raw", "calibrator": "passthrough", "solver": solver, "n": 4, "beta": 1.0,
             "seed": seed, "t": None, "eval/kl": 0.3}
    for n in (1, 4):
        final.update({f"eval/bon_win_rate@{n}": 0.6, f"eval/won_win_rate@{n}": 0.6,
                      f"eval/bon_win_rate@{n}_se": 0.01, f"eval/won_win_rate@{n}_se": 0.01})
    (d / "final_metrics.json").write_text(json.dumps(final))
    return d


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped member" in r.getMessage()]


def test_a_truncated_final_metrics_is_named_skipped_and_never_archived(tmp_path, caplog):
    sweep, dest = tmp_path / "sweep", tmp_path / "archive"
    member(sweep, "seed0", 0)
    member(sweep, "seed1", 1)
    bad = member(sweep, "seed2", 2) / "final_metrics.json"
    bad.write_text(bad.read_text()[:40])  # a copy cut short

    with caplog.at_level(logging.WARNING):
        assert [r["member"] for r in collect_runs(sweep)] == ["seed0", "seed1"]
    [warning] = skipped(caplog)
    assert f"skipped member seed2: {bad}: not readable JSON" in warning and "\n" not in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([str(sweep), "--archive", str(dest)]) == 0
    assert len(skipped(caplog)) == 1  # named once, by the one read of the sweep
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == ["seed0", "seed1"]  # seed2 not archived
    assert [r["member"] for r in csv.DictReader(open(dest / "study_runs.csv"))] == ["seed0", "seed1"]


def test_a_final_metrics_that_is_no_object_is_named_and_skipped(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    member(sweep, "seed0", 0)
    (member(sweep, "seed1", 1) / "final_metrics.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING):
        assert [r["member"] for r in collect_runs(sweep)] == ["seed0"]
    [warning] = skipped(caplog)
    assert "seed1/final_metrics.json: expected a JSON object" in warning


@pytest.mark.parametrize("value, reason", [("nan", "'nan' is not a finite number"), ("", "'' is not a number"),
                                           ("0.6x", "'0.6x' is not a number")])
def test_a_bad_per_prompt_value_is_named_and_skipped_not_a_silent_na(tmp_path, caplog, value, reason):
    """Two solvers, two seeds each: one ppo seed's per-prompt table has a bad value. It is skipped, so the paired
    comparison is the remaining seeds' (a number), not n/a for the whole pair."""
    sweep = tmp_path / "sweep"
    member(sweep, "0", 0)
    member(sweep, "1", 1)
    member(sweep, "2", 0, solver="ppo")
    rows = [[f"p{j}", 0.5, 0.7] for j in range(4)]
    rows[2][1] = value
    bad = member(sweep, "3", 1, solver="ppo", per_prompt=rows) / "eval_per_prompt.csv"

    with caplog.at_level(logging.WARNING):
        study = analyze_sweep(sweep)
    [warning] = skipped(caplog)
    assert f"skipped member 3: {bad}: line 4, column bon_win_rate@1: {reason}" in warning
    assert [r["member"] for r in study.runs] == ["0", "1", "2"]
    [pair] = study.paired
    assert (pair["method_a"], pair["method_b"], pair["seeds_a"], pair["seeds_b"]) == ("raw [rloo]", "raw [ppo]", 2, 1)
    assert math.isfinite(pair["diff"]) and math.isfinite(pair["se"])
    # rloo seeds 0, 1 average 0.6 + 0.01 j + 0.01; ppo seed 0 has 0.6 + 0.01 j
    assert pair["diff"] == pytest.approx(0.01)


def test_a_sweep_whose_every_member_is_damaged_is_refused_before_anything_is_written(tmp_path, capsys):
    sweep, dest = tmp_path / "sweep", tmp_path / "archive"
    (member(sweep, "seed0", 0) / "final_metrics.json").write_text("{")
    assert main([str(sweep)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {sweep} has no finished run the study can read") and "\n" not in err
    assert main([str(sweep), "--archive", str(dest)]) == 2
    assert not dest.exists() and not (sweep / "study_runs.csv").exists()


def test_study_command_line_on_an_empty_or_missing_directory_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for given, says in [(tmp_path / "empty", "has no finished run"), (tmp_path / "missing", "is not a directory")]:
        for archive in ([], ["--archive", str(tmp_path / "archive")]):
            assert main([str(given), *archive]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {given} {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "archive").exists()


def test_sweep_summary_command_line_on_a_missing_or_empty_directory_fails_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for given, says in [(tmp_path / "missing", "is not a directory"), (tmp_path / "empty", "has no finished run")]:
        done = subprocess.run([sys.executable, "-m", "infalign.study.sweep", str(given)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
        assert done.stderr.startswith(f"error: {given} {says}") and done.stderr.count("\n") == 1, done.stderr
