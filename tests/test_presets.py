"""Presets compose (infalign.runtime.presets): the preset groups set disjoint keys, every method x solver x scale keeps
each preset's own values, and a command line that contradicts the recorded choices is refused."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from infalign.runtime.errors import ConfigError
from infalign.runtime.presets import check_presets, preset_defaults, preset_values

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS, SOLVERS, SCALES = ([p.stem for p in sorted((CONF / g).glob("*.yaml"))] for g in ("method", "solver", "scale"))


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return cfg, OmegaConf.to_container(cfg.hydra.runtime.choices)


def raw_value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node._get_node(part) if OmegaConf.is_config(node) else None
    return node._value() if node is not None else None


def test_the_groups_hold_presets():
    assert "ppo" in SOLVERS and "distill_rl" in SOLVERS and METHODS and SCALES


def test_the_preset_groups_set_disjoint_keys():
    """So no preset silently replaces another's value, whatever the defaults list's order (a scale that needs a
    solver of its own picks it in its defaults list: conf/scale/smollm2.yaml picks rloo_lora)."""
    for (a, choices_a), (b, choices_b) in itertools.combinations(zip(("method", "solver", "scale"),
                                                                     (METHODS, SOLVERS, SCALES)), 2):
        for ca, cb in itertools.product(choices_a, choices_b):
            common = preset_values(a, ca).keys() & preset_values(b, cb).keys()
            assert not common, f"conf/{a}/{ca}.yaml and conf/{b}/{cb}.yaml both set {sorted(common)}"


@pytest.mark.parametrize("method, solver, scale", list(itertools.product(METHODS, SOLVERS, SCALES)))
def test_every_method_solver_scale_keeps_each_presets_values(method, solver, scale):
    overrides = [f"method={method}", f"solver={solver}", f"scale={scale}"]
    cfg, choices = compose_train(*overrides)
    check_presets(choices, overrides)
    assert (choices["method"], choices["solver"], choices["scale"]) == (method, solver, scale)  # what is recorded
    for group, choice in (("solver", solver), ("scale", scale)):
        for key, value in preset_values(group, choice).items():
            assert raw_value(cfg, key) == value, f"{key}: conf/{group}/{choice}.yaml's {value!r} was replaced"
    for group, choice in preset_defaults("method", method).items():
        assert choices[group] == choice  # the method is its transform and calibrator


def test_the_smollm2_scale_picks_the_lora_solver_and_a_command_line_solver_wins():
    cfg, choices = compose_train("scale=smollm2")
    assert choices["solver"] == "rloo_lora" and cfg.optimizer.lr == 1e-3 and cfg.scheduler.warmup_steps == 2
    assert preset_values("solver", "rloo_lora").items() >= preset_values("solver", "rloo").items()  # rloo, plus
    overrides = ["method=bon_exp", "solver=distill", "scale=smollm2"]
    cfg, choices = compose_train(*overrides)
    check_presets(choices, overrides)
    assert choices["solver"] == "distill" and cfg.optimizer.lr == 3e-5 and cfg.scheduler.warmup_steps == 5
    assert cfg.distill.m == 256 and cfg.rl.minibatch_size == 8  # the scale's sizes stay


@pytest.mark.parametrize("overrides, match", [
    (["method=bon_exp", "transform=won_exp"], r"method=bon_exp is transform=bon_exp .* sets transform=won_exp"),
    (["method=raw", "calibrator=empirical"], r"method=raw .* sets calibrator=empirical"),
    (["solver=rloo", "rl.algo=ppo"], r"rl.algo=ppo contradicts solver=rloo .*choose solver=ppo"),
    (["rl.kl_penalty=exact"], r"rl.kl_penalty=exact contradicts solver=rloo .*choose solver=(distill_rl|exact)"),
    (["distill.iterations=5"], r"distill.iterations=5 .* under solver=rloo, which does not distil"),
    (["scale=smollm2", "rl.algo=ppo"], r"rl.algo=ppo contradicts solver=rloo_lora \(rl.algo=rloo\).*solver=ppo"),
])
def test_a_command_line_that_contradicts_the_recorded_choice_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_presets(compose_train(*overrides)[1], overrides)


@pytest.mark.parametrize("overrides", [
    ["method=bon_exp", "transform=bon_exp"],  # the same choice, said twice
    ["transform=won_exp"],  # no method: the transform is recorded as the method
    ["solver=ppo", "rl.ppo_epochs=4"],  # tuning a solver is not changing it
    ["solver=distill_rl", "distill.iterations=2", "rl.iterations=4"],
])
def test_consistent_command_lines_compose(overrides):
    check_presets(compose_train(*overrides)[1], overrides)


def test_no_preset_file_repeats_its_own_name_in_a_key():
    for group in ("method", "solver"):
        for path in sorted((CONF / group).glob("*.yaml")):
            assert group not in preset_values(group, path.stem), f"{path} sets `{group}:` (Hydra records the choice)"
