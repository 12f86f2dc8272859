"""Issue 28, item 4: a sweep is checked before it starts, a study preset says how it runs, every solver composes with
every scale.

- `python train.py -m ...` composes and checks every member's config before the first member trains
  (infalign.runtime.sweeper, Hydra's BasicSweeper with that step in front): a refused member stops the sweep in one
  line naming it, and nothing is written into the sweep directory. (A good sweep still runs and is summarised:
  tests/test_train.py's `n=2,4` sweep and tests/test_study.py's `study=smoke` run through the same sweeper.)
- `python train.py study=<name>` without `-m` is refused in one line naming the command; `--cfg job` prints the
  study's first member (its method, beta and seed), or the member the command line names.
- every solver preset composes with every scale preset and passes the config check (`distill_rl` distils half of
  whatever rl.iterations the scale sets).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import study_sweep
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from infalign.config.check import check_config
from infalign.runtime.paths import conf_dir

REPO = Path(__file__).resolve().parents[1]
CONF = Path(conf_dir())
SOLVERS = sorted(p.stem for p in (CONF / "solver").glob("*.yaml"))
SCALES = [None, *sorted(p.stem for p in (CONF / "scale").glob("*.yaml"))]  # None: the default sizes


def train(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    return done.stderr.strip()


def test_a_sweep_with_a_refused_member_stops_before_any_member_trains(tmp_path):
    """Before: member 0 trained, then member 1 failed (calibration.m=8 is below N=16) and no summary was written."""
    sweep = tmp_path / "sweep"
    line = one_error_line(train("-m", "scale=smoke", "n=2,16", f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache"))
    assert line.startswith("error: member 1 (scale=smoke n=16): calibration.m=8 is below N=16"), line
    assert not sweep.exists() or list(sweep.iterdir()) == []  # no multirun.yaml, no member directory


def test_members_are_checked_with_their_own_choices(tmp_path):
    """A study's beta is read from its grid at the member's method (`${hydra:runtime.choices.method}`): the check sees
    each member's choices, as the member will. study=smoke's grids have one beta per method: index 1 is outside."""
    sweep = tmp_path / "sweep"
    line = one_error_line(train("-m", "study=smoke", "study.beta_index=1", f"hydra.sweep.dir={sweep}",
                                cache=tmp_path / "cache"))
    assert line.startswith("error: member 0 (method=calibrated study.beta_index=1 seed=0 study=smoke): beta cannot "
                           "be resolved"), line
    assert "index 1 is outside the list [0.05]" in line
    assert not sweep.exists() or list(sweep.iterdir()) == []


def test_a_study_without_multirun_says_to_add_it(tmp_path):
    run = tmp_path / "run"
    line = one_error_line(train("study=smoke", f"hydra.run.dir={run}", cache=tmp_path / "cache"))
    assert line == "error: study=smoke is a sweep: run it with -m (python train.py -m study=smoke)"
    assert not run.exists() or list(run.iterdir()) == []
    line = one_error_line(train("study=bon", "seed=1", f"hydra.run.dir={run}", cache=tmp_path / "cache"))
    assert line == "error: study=bon is a sweep: run it with -m (python train.py -m study=bon seed=1)"


def test_a_study_prints_its_first_member_or_the_one_named(tmp_path):
    """`--cfg job` composes the study as a run: its sweep's first method (the study's defaults list), beta_index 0,
    seed 0; `method=` / `seed=` on the command line print another member."""
    for args, method, beta, seed in [((), "calibrated", 0.05, 0), (("method=bon_exp", "seed=1"), "bon_exp", 0.05, 1)]:
        done = train("study=smoke", *args, "--cfg", "job", "--resolve", cache=tmp_path / "cache")
        assert done.returncode == 0, done.stderr[-3000:]
        cfg = yaml.safe_load(done.stdout)
        assert (cfg["beta"], cfg["seed"], cfg["study"]["name"]) == (beta, seed, "smoke")
        transform = {"calibrated": "infalign.core.transforms.IdentityTransform",
                     "bon_exp": "infalign.theory.factories.bon_exp"}[method]
        assert cfg["transform"]["_target_"] == transform
    for study in sorted(p.stem for p in (CONF / "study").glob("*.yaml")):  # each study's first member is its sweep's
        params = study_sweep(study)
        cfg, choices = compose_train(f"study={study}")
        assert choices["method"] == params["method"].split(",")[0], study
        OmegaConf.to_container(cfg, resolve=True)  # beta resolves from the method's grid


def compose_train(*overrides):
    """`(cfg, choices)` as `python train.py <overrides>` composes them, with Hydra's config of the run set (the
    config reads `${hydra:runtime.choices.method}`, the preset check the command line's overrides)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


@pytest.mark.parametrize("scale", SCALES, ids=str)
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_composes_with_every_scale(solver, scale):
    """Before: solver=distill_rl set distill.iterations=15, above both scales' rl.iterations (3 and 12)."""
    cfg, choices = compose_train(f"solver={solver}", *([f"scale={scale}"] if scale else []))
    check_config(cfg, choices)
    assert choices["solver"] == solver
    if solver == "distill_rl":  # half of the iterations distil, whatever the scale sets
        assert cfg.distill.iterations == -(-cfg.rl.iterations // 2) >= 1
