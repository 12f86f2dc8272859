"""Archiving a study's members (infalign.study.archive, `python -m infalign.study ... --archive DIR`)."""

import csv
import json

import pytest

from infalign.study.__main__ import main
from infalign.study.archive import ARCHIVED_FILES, ArchiveConflictError, archive_members
from infalign.study.runs import collect_runs, per_prompt_rows
from infalign.study.tilt_fit import read_tilt_fit


def member(sweep, name, seed, win=0.6, finished=True):
    """A member folder as train.py leaves it: config, per-prompt table, metrics log, a checkpoint, samples."""
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(json.dumps({"n": 4, "beta": 1.0, "transform": {
        "_target_": "infalign.core.transforms.RawTransform"}}))
    (d / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    (d / "logs").mkdir()
    (d / "logs" / "metrics.csv").write_text("step,train/policy/response_length\n0,30\n1,28\n")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (d / "eval_samples.jsonl").write_text("{}\n")
    (d / "tilt_fit.json").write_text(json.dumps({"held_out": {"slope": 0.5 + seed, "shape": 0.25}}))
    with open(d / "eval_per_prompt.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "bon_win_rate@1", "bon_win_rate@4"])
        w.writerows([[f"p{j}", win + 0.01 * j, win + 0.02 * j] for j in range(4)])
    if finished:
        final = {"method": "raw", "transform": "raw", "calibrator": "passthrough", "n": 4, "beta": 1.0, "seed": seed,
                 "t": None, "eval/kl": 0.3 + 0.05 * seed}
        for n in (1, 4):
            final.update({f"eval/bon_win_rate@{n}": win, f"eval/won_win_rate@{n}": win,
                          f"eval/bon_win_rate@{n}_se": 0.01, f"eval/won_win_rate@{n}_se": 0.01})
        (d / "final_metrics.json").write_text(json.dumps(final))
    return d


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_archive_copies_what_the_study_reads_of_finished_members_only(tmp_path):
    sweep, dest = tmp_path / "sweep", tmp_path / "docs" / "study"
    member(sweep, "raw_beta1.0_seed0", 0)
    member(sweep, "raw_beta1.0_seed1", 1, win=0.65)
    member(sweep, "raw_beta1.0_seed2", 2, finished=False)  # failed or still running: not archived
    (sweep / "multirun.yaml").write_text("study: {matched_kl: null}\n")

    result = archive_members(sweep, dest)

    assert result.archived == ["raw_beta1.0_seed0", "raw_beta1.0_seed1"] and result.unchanged == []
    assert files(dest) == sorted(["multirun.yaml"] + [f"raw_beta1.0_seed{s}/{f}" for s in (0, 1) for f in ARCHIVED_FILES])
    for s in (0, 1):
        for f in ARCHIVED_FILES:
            assert (dest / f"raw_beta1.0_seed{s}" / f).read_bytes() == (sweep / f"raw_beta1.0_seed{s}" / f).read_bytes()
    # the archive is a sweep directory: the study reads the same runs and per-prompt tables from it
    assert collect_runs(dest) == collect_runs(sweep)
    assert per_prompt_rows(dest / "raw_beta1.0_seed1") == per_prompt_rows(sweep / "raw_beta1.0_seed1")
    assert read_tilt_fit(dest / "raw_beta1.0_seed1") == {"slope": 1.5, "shape": 0.25}  # the tilt fit, where it ran


def test_a_later_part_adds_members_and_a_rerun_changes_nothing(tmp_path):
    part1, part2, dest = tmp_path / "part1", tmp_path / "part2", tmp_path / "archive"
    member(part1, "raw_beta1.0_seed0", 0)
    archive_members(part1, dest)
    before = {f: (dest / f).stat().st_mtime_ns for f in files(dest)}

    again = archive_members(part1, dest)
    assert again.archived == [] and again.unchanged == ["raw_beta1.0_seed0"]
    assert {f: (dest / f).stat().st_mtime_ns for f in files(dest)} == before  # nothing rewritten

    member(part2, "raw_beta1.0_seed1", 1)
    assert archive_members(part2, dest).archived == ["raw_beta1.0_seed1"]
    assert [r["member"] for r in collect_runs(dest)] == ["raw_beta1.0_seed0", "raw_beta1.0_seed1"]


def test_a_member_archived_from_another_run_is_never_overwritten(tmp_path):
    first, other, dest = tmp_path / "first", tmp_path / "other", tmp_path / "archive"
    member(first, "raw_beta1.0_seed0", 0, win=0.6)
    archive_members(first, dest)
    kept = (dest / "raw_beta1.0_seed0" / "final_metrics.json").read_bytes()
    member(other, "raw_beta1.0_seed0", 0, win=0.7)  # same name, another result
    member(other, "raw_beta1.0_seed5", 5)            # a new member beside it is not written either

    with pytest.raises(ArchiveConflictError, match=r"raw_beta1.0_seed0/final_metrics.json.*Nothing was written"):
        archive_members(other, dest)
    assert (dest / "raw_beta1.0_seed0" / "final_metrics.json").read_bytes() == kept
    assert not (dest / "raw_beta1.0_seed5").exists()


def test_archive_refuses_a_destination_inside_the_sweep_and_an_empty_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    member(sweep, "raw_beta1.0_seed0", 0)
    with pytest.raises(ValueError, match="inside it"):
        archive_members(sweep, sweep / "archive")
    with pytest.raises(ValueError, match="inside it"):
        archive_members(sweep, sweep)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished member"):
        archive_members(tmp_path / "empty", tmp_path / "archive")


def test_command_line_archives_then_writes_the_archives_tables(tmp_path, capsys):
    sweep, dest = tmp_path / "sweep", tmp_path / "archive"
    member(sweep, "raw_beta1.0_seed0", 0)
    member(sweep, "raw_beta1.0_seed1", 1, win=0.65)

    assert main([str(sweep), "--archive", str(dest)]) == 0
    runs = list(csv.DictReader(open(dest / "study_runs.csv")))
    assert [r["member"] for r in runs] == ["raw_beta1.0_seed0", "raw_beta1.0_seed1"]
    assert not (sweep / "study_runs.csv").exists()  # the tables are the archive's, written there

    other = tmp_path / "other"
    member(other, "raw_beta1.0_seed0", 0, win=0.9)
    capsys.readouterr()
    assert main([str(other), "--archive", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("archive:") and "Nothing was written" in err
    with pytest.raises(SystemExit) as e:
        main([str(sweep), "--archive"])
    assert e.value.code == 2
