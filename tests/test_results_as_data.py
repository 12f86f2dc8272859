"""A results folder is read as data, never executed (issue 12): `python -m infalign.study.sweep` and
`infalign.study` rebuild each run's transform from its saved config through one allow-listed reader
(infalign.study.run_config.transform_from_run), never through Hydra's `instantiate`, and with the `t` the run
recorded (no solver runs again).

The sweep summary skips the theory curve of a refused member with a warning (its measured points and the
CSV row are still data worth showing); the study raises a ValueError naming the file (its gap-to-theory
columns would otherwise be silently missing for that run)."""

import json
import logging

import pytest
from test_study import fake_final, fake_member

import infalign.theory
from infalign.core.transforms import BoNExpTransform, LogTransform, WoNExpTransform
from infalign.study import write_study
from infalign.study.run_config import ALLOWED_TRANSFORMS, transform_from_run
from infalign.study.runs import collect_runs
from infalign.study.sweep import _theory_curves, write_summary

VICTIM_TEXT = "precious results\n"


def calibrated_final(seed=0):
    return fake_final("calibrated", "identity", 0.2, seed, 0.5, 0.6, 0.7, 0.65)


def plant(root, i, transform_cfg, final=None, **root_cfg):
    """A sweep member whose saved config holds `transform_cfg` (and `root_cfg` at the top level)."""
    final = final or calibrated_final(i)
    fake_member(root, i, final, transform_cfg)
    if root_cfg:
        path = root / str(i) / ".hydra" / "config.yaml"
        path.write_text(json.dumps({**json.loads(path.read_text()), **root_cfg}))
    return root / str(i)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def open_for_writing(victim):
    return {"_target_": "builtins.open", "file": str(victim), "mode": "w"}


@pytest.fixture
def planted_sweep(tmp_path, victim):
    """One legit calibrated member and one whose transform is `builtins.open(victim, "w")`."""
    sweep = tmp_path / "sweep"
    plant(sweep, 0, {"_target_": "infalign.core.transforms.IdentityTransform"})
    bad = plant(sweep, 1, open_for_writing(victim))
    return sweep, bad / ".hydra" / "config.yaml"


def test_sweep_summary_skips_a_planted_target_with_a_warning(planted_sweep, victim, caplog):
    sweep, bad_cfg = planted_sweep
    with caplog.at_level(logging.WARNING, logger="infalign.study.sweep"):
        csv_path, png_path = write_summary(sweep)
    assert victim.read_text() == VICTIM_TEXT
    assert csv_path.read_text().count("\n") == 3 and png_path.read_bytes()[:4] == b"\x89PNG"  # both runs' rows
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(bad_cfg) in warning and "builtins.open" in warning and "infalign.core.transforms.BoNExpTransform" in warning
    assert list(_theory_curves(sweep, collect_runs(sweep))[0]) == [("identity", 4)]  # the legit member's curve only
    assert not list(sweep.glob(".*.tmp"))  # the atomic writers left no temp files


def test_study_refuses_a_planted_target_naming_the_file(planted_sweep, victim):
    sweep, bad_cfg = planted_sweep
    with pytest.raises(ValueError, match="builtins.open") as err:
        write_study(sweep)
    assert str(bad_cfg) in str(err.value) and all(t in str(err.value) for t in ALLOWED_TRANSFORMS)
    assert victim.read_text() == VICTIM_TEXT
    assert not (sweep / "study_runs.csv").exists()


@pytest.mark.parametrize("case", ["nested target", "resolver", "resolver behind a reference", "list", "unknown class"])
def test_only_plain_parameters_of_project_transforms_are_read(tmp_path, victim, monkeypatch, case):
    monkeypatch.setenv("INFALIGN_TEST_EPS", "0.01")
    log = "infalign.core.transforms.LogTransform"
    transform_cfg, root_cfg = {
        "nested target": ({"_target_": log, "eps": open_for_writing(victim)}, {}),
        "resolver": ({"_target_": log, "eps": "${oc.env:INFALIGN_TEST_EPS}"}, {}),
        "resolver behind a reference": ({"_target_": log, "eps": "${eps}"}, {"eps": "${oc.env:INFALIGN_TEST_EPS}"}),
        "list": ({"_target_": log, "eps": [str(victim)]}, {}),
        "unknown class": ({"_target_": "infalign.core.transforms.Transform"}, {}),
    }[case]
    member = plant(tmp_path, 0, transform_cfg, **root_cfg)
    with pytest.raises(ValueError, match="config.yaml"):
        transform_from_run(calibrated_final(), member)
    assert victim.read_text() == VICTIM_TEXT


def test_plain_references_resolve_against_the_saved_root(tmp_path):
    member = plant(tmp_path, 0, {"_target_": "infalign.core.transforms.LogTransform", "eps": "${rl.eps}"},
                   rl={"eps": "${floor}"}, floor=0.01)
    transform = transform_from_run(calibrated_final(), member)
    assert isinstance(transform, LogTransform) and transform.eps == 0.01
    raw = fake_final("raw", "raw", 1.0, 0, 0.3, 0.6, 0.62, 0.7)
    assert transform_from_run(raw, plant(tmp_path, 1, open_for_writing(tmp_path / "x"))) is None  # never read


def test_recorded_n_and_beta_replace_a_study_resolver(tmp_path):
    """Study presets set `beta: ${infalign.pick:...}` (a custom resolver); the run recorded the value."""
    cfg = {"_target_": "infalign.core.transforms.OptimalTransform", "n": "${n}", "mode": "won", "beta": "${beta}"}
    member = plant(tmp_path, 0, cfg, final=dict(calibrated_final(), n=2, beta=0.5, transform="optimal"),
                   beta="${infalign.pick:${study.betas.${method}},${study.beta_index}}", n="${oc.env:NOT_SET_ANYWHERE}")
    transform = transform_from_run(json.loads((member / "final_metrics.json").read_text()), member)
    assert (transform.n, transform.mode, transform.beta) == (2, "won", 0.5)
    with pytest.raises(ValueError, match="not a plain"):  # without recorded values the resolver is refused
        transform_from_run({"transform": "optimal"}, member)


def test_recorded_t_is_used_and_no_solver_runs(tmp_path, monkeypatch):
    def no_solver(*args, **kwargs):
        raise AssertionError("t: auto was solved again instead of using the recorded t")

    monkeypatch.setattr(infalign.theory, "best_t", no_solver)
    monkeypatch.setattr(infalign.theory, "optimal_density", no_solver)
    sweep = tmp_path / "sweep"
    for i, (name, cls, t) in enumerate((("bon_exp", BoNExpTransform, 7.5), ("won_exp", WoNExpTransform, 3.25))):
        final = dict(fake_final(name, name, 0.2, 0, 0.5, 0.6, 0.7, 0.65), t=t)
        cfg = {"_target_": f"infalign.core.transforms.{cls.__name__}", "t": "auto", "n": "${n}", "beta": "${beta}",
               "target_kl": None}
        member = plant(sweep, i, cfg, final=final)
        transform = transform_from_run(final, member)
        assert type(transform) is cls and transform.t == t
    curves = _theory_curves(sweep, collect_runs(sweep))[0]
    assert sorted(curves) == [("bon_exp(t=7.5)", 4), ("won_exp(t=3.25)", 4)]
    assert write_summary(sweep) is not None
