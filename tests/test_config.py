"""Config groups and the config check: `method=<name>` and `scale=<name>` compose; `check_config` refuses an
unknown key (or a bad value), in a model or reward config too, naming the key and the file, before torch is
imported; the keys' defaults and docs come from `infalign.config.schema` and `infalign.config.models`."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import study_sweep
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from infalign.config import RUN, ConfigError, processes
from infalign.config.__main__ import markdown
from infalign.config.check import check_config
from infalign.config.models import LOADERS, RUNTIME, TRAINER_KEYS
from infalign.config.schema import TRAINER, defaults
from infalign.models.loaders import call_loader, check_loader_config
from infalign.runtime.paths import conf_dir

CONF = Path(conf_dir())
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def compose_train(*overrides):
    """`(cfg, choices)` as `python train.py <overrides>` composes them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as train.py has it: `${hydra:runtime.choices.method}` (studies) reads it
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def test_methods_and_scales_are_separate_groups():
    assert METHODS == ["bon_distill", "bon_exp", "calibrated", "raw", "won_exp"]
    assert sorted(p.stem for p in (CONF / "scale").glob("*.yaml")) == ["small", "smoke", "smollm2"]
    assert not (CONF / "experiment").exists() and not (CONF / "preset").exists()
    defaults = yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]
    groups = [next(iter(d)) if isinstance(d, dict) else d for d in defaults]
    # a scale overrides what a method sets; a study's own keys override both
    assert groups.index("method") < groups.index("scale") < groups.index("study")


@pytest.mark.parametrize("method", METHODS)
def test_a_method_composes_with_the_smoke_scale(method):
    preset = yaml.safe_load((CONF / "method" / f"{method}.yaml").read_text())
    assert "method" not in preset  # Hydra records the choice (hydra.runtime.choices); no key repeats the file's name
    cfg, choices = compose_train(f"method={method}", "scale=smoke")
    smoke, _ = compose_train("scale=smoke")
    assert choices["method"] == method and choices["scale"] == "smoke"
    for group in ("transform", "calibrator"):
        assert choices[group] == next(v for d in preset["defaults"] for k, v in d.items() if k.endswith(f"/{group}"))
    for key in ("data", "model", "reward", "rl", "calibration", "eval", "checkpoint"):  # sizes: the scale's
        assert cfg[key] == smoke[key], key
    assert cfg.rl.iterations == 3 and cfg.model.gpt2.n_layer == 1
    check_config(cfg, choices)


def test_the_smollm2_scale_picks_the_model_and_composes_with_a_method():
    cfg, choices = compose_train("method=calibrated", "scale=smollm2")
    assert choices["model"] == "smollm2" and choices["method"] == "calibrated" and choices["transform"] == "identity"
    assert cfg.model.prompt_format == "chat"  # an instruct model reads its chat template
    assert cfg.model.lora.r > 0  # adapters: no second copy of the weights, no Adam state for all of them
    assert cfg.eval.every == cfg.rl.iterations
    check_config(cfg, choices)


def test_the_default_has_no_method_and_the_build_config_takes_the_scale():
    cfg, choices = compose_train()
    assert choices["method"] is None and choices["scale"] is None and "method" not in cfg
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        build = compose("build", overrides=["scale=smoke"])
        assert compose("build", overrides=["scale=smollm2"]).model.name == "smollm2"  # its solver choice: unused
    smoke, _ = compose_train("scale=smoke")
    assert build.model == smoke.model and build.reward == smoke.reward and build.data == smoke.data


@pytest.mark.parametrize("override, match", [
    ("+model.tokenzier=1", r"model.tokenzier: unknown key in conf/model/tiny.yaml; known keys: _target_, gpt2, "
                           r"gradient_checkpointing, lora, name, prompt_format, seed, sft, tokenizer; did you mean "
                           r"'tokenizer'\?"),
    ("+model.gpt2.n_layers=2", r"model.gpt2.n_layers: unknown key in conf/model/tiny.yaml; known keys: dropout, "
                               r"n_embd, n_head, n_layer"),
    ("+reward.trian={}", r"reward.trian: unknown key in conf/reward/trained.yaml; known keys: .*backbone, head, .*train"),
    ("+reward.head.hiden=4", r"reward.head.hiden: unknown key in conf/reward/trained.yaml; known keys: dropout, "
                             r"hidden"),
    ("model.sft.loss_on=prompt", r"model.sft.loss_on must be 'all' or 'response' .*got 'prompt'"),
    ("model.prompt_format=plain", r"model.prompt_format must be 'raw' or 'chat' .*got 'plain'"),
    ("model.sft=3", r"model.sft must be a mapping"),
    ("~model.gpt2.n_head", r"model.gpt2.n_head must be set \(.*conf/model/tiny.yaml\)"),
    ("resume=1", r"^resume must be true, false or auto .*got 1;"),  # 1 == True in Python, not here
    ("resume_allow_changes=yes", r"^resume_allow_changes must be true or false .*got 'yes'"),
])
def test_a_bad_key_is_refused_naming_it(override, match):
    cfg, choices = compose_train(override)
    with pytest.raises(ValueError, match=match):
        check_config(cfg, choices)


def test_the_messages_name_the_scale_that_set_model_keys():
    cfg, choices = compose_train("model=smollm2", "scale=smoke")  # the smoke sizes are the tiny model's keys
    with pytest.raises(ValueError, match=r"model.tokenizer: unknown key in conf/model/smollm2.yaml \(as composed "
                                         r"with conf/scale/smoke.yaml\); known keys: _target_, cache_converted, dtype, "):
        check_config(cfg, choices)


def test_required_keys_and_cross_group_rules():
    cfg, choices = compose_train("model=hf")
    with pytest.raises(ValueError, match=r"model.name_or_path must be set \(.*conf/model/hf.yaml\); e.g. model.name_or_path="):
        check_config(cfg, choices)
    cfg, choices = compose_train("model=hf", "model.name_or_path=gpt2", "reward.backbone=policy_frozen")
    with pytest.raises(ValueError, match="reward.backbone=policy_frozen is built on the cached reference policy"):
        check_config(cfg, choices)
    cfg, choices = compose_train("model=hf", "model.name_or_path=gpt2", "reward=hf", "reward.name_or_path=x",
                                 "reward.input_format=pairs")
    with pytest.raises(ValueError, match=r"reward.input_format must be 'concat' or 'pair' .*got 'pairs'"):
        check_config(cfg, choices)
    cfg, _ = compose_train("+model.tokenzier=1")
    with pytest.raises(ValueError, match=r"model.tokenzier: unknown key in the model config \(conf/model/\)"):
        check_config(cfg)  # without Hydra's choices: no file name


@pytest.mark.parametrize("group", ["model", "reward"])
def test_every_shipped_config_fits_its_loader(group):
    """Each file's keys are its loader's, and the loader takes every key call_loader passes it."""
    import inspect

    from hydra.utils import get_method

    for path in sorted((CONF / group).glob("*.yaml")):
        cfg = OmegaConf.load(path)
        for key in cfg:
            if OmegaConf.is_missing(cfg, key):  # `???`: the user sets it (model.name_or_path=...)
                cfg[key] = "x"
        keys = check_loader_config(cfg, group, str(path))
        assert keys is LOADERS[group][cfg._target_], path
        params = inspect.signature(get_method(cfg._target_)).parameters
        passed = set(keys) - set(TRAINER_KEYS[group]) - {"_target_"} | set(RUNTIME.get(cfg._target_, ()))
        assert passed <= set(params), (path, passed - set(params))


def fake_loader(*, size: int, name_or_path: str = "x", cache_root=None):
    return size, name_or_path, cache_root


def test_call_loader_passes_a_loader_it_does_not_define_every_key_but_the_groups_own():
    cfg = OmegaConf.create({"_target_": f"{__name__}.fake_loader", "name": "fake", "size": 3})
    assert call_loader(cfg, "reward", cache_root="/c", data_cfg={"a": 1}) == (3, "x", None)  # `name`: not passed
    with pytest.raises(ConfigError, match=r"reward: the config has no _target_"):  # the config check, not the loader
        check_loader_config({"size": 3}, "reward")


def test_optional_nested_keys_may_be_left_out():
    cfg, choices = compose_train("~model.gpt2.dropout", "~model.sft.loss_on", "~reward.head")
    check_config(cfg, choices)


# ------------------------------------------------------------------------------------------- the schema
GROUPS = ("study", "solver", "scale", "method", "model", "reward", "trainer", "transform", "calibrator", "data",
          "logger")


def shipped_options():
    """Every option of every config group, as the overrides that compose it the way it is run: a study preset
    with its sweep's first member (a study runs as `-m`, and its beta grids are indexed by method)."""
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            overrides = [f"{group}={path.stem}"]
            if group == "study":
                params = study_sweep(path.stem)
                overrides += [f"{k}={re.sub(r'^range[(].*', '0', str(v).split(',')[0])}" for k, v in params.items()]
            if group == "transform" and path.stem == "raw":
                overrides.append("calibrator=passthrough")  # raw rewards go with the passthrough calibrator
            if group == "calibrator" and path.stem == "passthrough":
                overrides.append("transform=raw")
            if group in ("model", "reward") and path.stem == "hf":
                overrides.append(f"{group}.name_or_path=org/name")  # `???` in the file: the user names the model
            yield overrides


# Refused with scale=smoke by design: its model and reward keys are model=tiny's and reward=trained's
# (conf/scale/smoke.yaml)
# solver=distill at smoke size: one distillation step per iteration, so its warm-up of 5 steps outlasts the run (warned)
# scale=small and the studies run at it (study=shape evaluates 64 training prompts; smoke trains on 12): their own size
NOT_AT_SMOKE_SCALE = {"model=hf", "model=smollm2", "reward=hf", "solver=distill", "study=distill", "scale=small",
                      "study=maxk", "study=shape", "study=shape_lr"}


@pytest.mark.parametrize("overrides", list(shipped_options()), ids=" ".join)
def test_every_shipped_option_passes_the_schema_without_a_warning(overrides):
    for scale in ([], ["scale=smoke"]):
        if scale and set(overrides) & NOT_AT_SMOKE_SCALE:
            continue
        cfg, choices = compose_train(*overrides, *scale)
        assert check_config(cfg, choices) == [], (overrides, scale)


def test_distill_rl_distils_half_of_the_smoke_scales_iterations():
    """Was refused (distill.iterations=15 of 3); every solver x scale: tests/test_sweep_checks.py."""
    cfg, choices = compose_train("solver=distill_rl", "scale=smoke")
    assert (cfg.distill.iterations, cfg.rl.iterations) == (2, 3)
    check_config(cfg, choices)


def test_the_defaults_are_defined_once():
    """conf/train.yaml composes the schema's defaults (`base_train`) and repeats none of its keys."""
    raw = yaml.safe_load((CONF / "train.yaml").read_text())
    assert raw["defaults"][0] == "base_train"
    assert not set(RUN) & set(raw)
    cfg, _ = compose_train("logger=none")
    base = OmegaConf.create(defaults(RUN))
    for name in RUN:
        if name not in ("distill",):  # the default solver (conf/solver/rloo.yaml) sets rl.algo and rl.kl_penalty
            assert OmegaConf.to_container(cfg)[name] == OmegaConf.to_container(base)[name], name


def test_the_configuration_reference_is_current():
    assert (CONF.parent / "docs" / "configuration.md").read_text() == markdown(), \
        "regenerate: python -m infalign.config --markdown > docs/configuration.md"


def test_an_old_key_name_is_refused_with_its_new_name():
    cfg, choices = compose_train("+calibration.eval_partition=test")
    with pytest.raises(ConfigError, match=r"^calibration.eval_partition moved to data.eval_partition; "
                                          r"e.g. data.eval_partition=test$"):
        check_config(cfg, choices)


def test_the_schema_counts_optimizer_steps_as_the_solver_does():
    from infalign.config.check import optimizer_steps
    from infalign.trainer.pieces import build_solver

    for overrides in ([], ["rl.algo=ppo"], ["solver=exact"], ["solver=distill_rl"], ["solver=distill", "scale=smoke"]):
        cfg, _ = compose_train(*overrides, "logger=none")  # the wandb logger's save_dir needs Hydra's runtime
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert optimizer_steps(plain) == build_solver(cfg).optimizer_steps(cfg.rl.iterations), overrides


@pytest.mark.parametrize("trainer, expected", [
    ({"devices": 2, "num_nodes": 3}, 6), ({"devices": "2"}, 2), ({"devices": [0, 1]}, 2), ({"devices": "0,1"}, 2),
    ({"devices": "auto"}, None), ({"devices": -1}, None), ({}, None)])
def test_processes(trainer, expected):
    assert processes(trainer) == expected


@pytest.mark.parametrize("value, ok", [
    (1, True), (8, True), (-1, True), ("auto", True), ("2", True), ([0, 1], True), ("0,1", True), ("1,", True),
    (0, False), (-2, False), ("0", False), ([], False), ([-1], False), ("gpu", False), (True, False), (1.5, False)])
def test_the_devices_rule_takes_what_lightning_takes(value, ok):
    assert TRAINER["devices"].rule.test(value) is ok


def test_a_study_picks_each_arms_beta_by_solver_method_and_n():
    """`${infalign.pick:<mapping>,${n}}`: study=maxk and study=shape key their betas by solver, method and N."""
    from infalign.runtime.paths import pick

    assert pick({4: 0.14, 8: 0.08}, "8") == 0.08 and pick({"a": 1}, "a") == 1 and pick([0.5, 0.2], 1) == 0.2
    with pytest.raises(KeyError, match="not one of the keys"):
        pick({4: 0.14}, 16)
    for overrides, beta in ((["study=maxk", "solver=maxk", "n=8"], 0.04), (["study=maxk", "n=4"], 0.14),
                            (["study=shape", "method=won_exp"], 0.002), (["study=shape", "method=raw", "n=4"], 0.05),
                            (["study=shape_lr", "method=bon_exp"], 0.15), (["study=shape_lr", "n=4"], 0.14)):
        cfg, _ = compose_train(*overrides, "seed=0")
        assert cfg.beta == beta, overrides
    cfg, _ = compose_train("study=shape_lr", "seed=0")  # study=shape composed first, its own learning rate
    assert cfg.optimizer.lr == 1e-3 and cfg.data.train_prompts == 16 and cfg.study.name == "shape_lr"
