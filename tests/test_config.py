"""Config groups and the config check: `method=<name>` and `scale=<name>` compose; `validate_config` refuses an
unknown key (or a bad value) in a model or reward config, naming the key and the file, before any model loads."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from infalign.models.loaders import RUNTIME, call_loader, check_loader_config, loader_schema
from infalign.runtime.paths import conf_dir
from infalign.trainer.config import validate_config

CONF = Path(conf_dir())
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def compose_train(*overrides):
    """`(cfg, choices)` as `python train.py <overrides>` composes them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def test_methods_and_scales_are_separate_groups():
    assert METHODS == ["bon_distill", "bon_exp", "calibrated", "raw", "won_exp"]
    assert sorted(p.stem for p in (CONF / "scale").glob("*.yaml")) == ["smoke", "smollm2"]
    assert not (CONF / "experiment").exists() and not (CONF / "preset").exists()
    defaults = yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]
    groups = [next(iter(d)) if isinstance(d, dict) else d for d in defaults]
    # a scale overrides what a method sets; a study's own keys override both
    assert groups.index("method") < groups.index("scale") < groups.index("study")


@pytest.mark.parametrize("method", METHODS)
def test_a_method_composes_with_the_smoke_scale(method):
    preset = yaml.safe_load((CONF / "method" / f"{method}.yaml").read_text())
    assert preset["method"] == method  # the study grids are indexed by it; final_metrics.json records the choice
    cfg, choices = compose_train(f"method={method}", "scale=smoke")
    smoke, _ = compose_train("scale=smoke")
    assert choices["method"] == method and choices["scale"] == "smoke"
    for group in ("transform", "calibrator"):
        assert choices[group] == next(v for d in preset["defaults"] for k, v in d.items() if k.endswith(f"/{group}"))
    for key in ("data", "model", "reward", "rl", "calibration", "eval", "checkpoint"):  # sizes: the scale's
        assert cfg[key] == smoke[key], key
    assert cfg.rl.iterations == 3 and cfg.model.gpt2.n_layer == 1
    validate_config(cfg, choices)


def test_the_smollm2_scale_picks_the_model_and_composes_with_a_method():
    cfg, choices = compose_train("method=calibrated", "scale=smollm2")
    assert choices["model"] == "smollm2" and choices["method"] == "calibrated" and choices["transform"] == "identity"
    assert cfg.model.prompt_format == "chat"  # an instruct model reads its chat template
    assert cfg.model.lora.r > 0  # adapters: no second copy of the weights, no Adam state for all of them
    assert cfg.eval.every == cfg.rl.iterations
    validate_config(cfg, choices)


def test_the_default_has_no_method_and_the_build_config_takes_the_scale():
    cfg, choices = compose_train()
    assert choices["method"] is None and choices["scale"] is None and "method" not in cfg
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        build = compose("build", overrides=["scale=smoke"])
    smoke, _ = compose_train("scale=smoke")
    assert build.model == smoke.model and build.reward == smoke.reward and build.data == smoke.data


@pytest.mark.parametrize("override, match", [
    ("+model.tokenzier=1", r"model.tokenzier: unknown key in conf/model/tiny.yaml; known keys: gpt2, "
                           r"gradient_checkpointing, lora, name, prompt_format, seed, sft, tokenizer; did you mean "
                           r"'tokenizer'\?"),
    ("+model.gpt2.n_layers=2", r"model.gpt2.n_layers: unknown key in conf/model/tiny.yaml; known keys: dropout, "
                               r"n_embd, n_head, n_layer"),
    ("+reward.trian={}", r"reward.trian: unknown key in conf/reward/trained.yaml; known keys: backbone, head, .*train"),
    ("+reward.head.hiden=4", r"reward.head.hiden: unknown key in conf/reward/trained.yaml; known keys: dropout, "
                             r"hidden"),
    ("model.sft.loss_on=prompt", r"model.sft.loss_on must be one of 'all', 'response', got 'prompt'"),
    ("model.prompt_format=plain", r"model.prompt_format must be one of 'raw', 'chat', got 'plain'"),
    ("model.sft=3", r"model.sft must be a mapping"),
    ("~model.gpt2.n_head", r"model.gpt2.n_head must be set \(conf/model/tiny.yaml\)"),
])
def test_a_bad_model_or_reward_key_is_refused_naming_it(override, match):
    cfg, choices = compose_train(override)
    with pytest.raises(ValueError, match=match):
        validate_config(cfg, choices)


def test_the_messages_name_the_scale_that_set_model_keys():
    cfg, choices = compose_train("model=smollm2", "scale=smoke")  # the smoke sizes are the tiny model's keys
    with pytest.raises(ValueError, match=r"model.tokenizer: unknown key in conf/model/smollm2.yaml \(as composed "
                                         r"with conf/scale/smoke.yaml\); known keys: cache_converted, dtype, "):
        validate_config(cfg, choices)


def test_required_keys_and_cross_group_rules():
    cfg, choices = compose_train("model=hf")
    with pytest.raises(ValueError, match=r"model.name_or_path must be set: hf_policy \(conf/model/hf.yaml\)"):
        validate_config(cfg, choices)
    cfg, choices = compose_train("model=hf", "model.name_or_path=gpt2", "reward.backbone=policy_frozen")
    with pytest.raises(ValueError, match="reward.backbone=policy_frozen is built on the cached reference policy"):
        validate_config(cfg, choices)
    cfg, choices = compose_train("model=hf", "model.name_or_path=gpt2", "reward=hf", "reward.name_or_path=x",
                                 "reward.input_format=pairs")
    with pytest.raises(ValueError, match=r"reward.input_format must be one of 'concat', 'pair', got 'pairs' "
                                         r"\(conf/reward/hf.yaml\)"):
        validate_config(cfg, choices)
    cfg, choices = compose_train("method=raw")
    cfg.method = "classic"  # a preset whose `method` is not its file name
    with pytest.raises(ValueError, match="conf/method/raw.yaml sets method: 'classic'"):
        validate_config(cfg, choices)
    cfg, _ = compose_train("+model.tokenzier=1")
    with pytest.raises(ValueError, match=r"model.tokenzier: unknown key in the model config \(conf/model/\)"):
        validate_config(cfg)  # without Hydra's choices: no file name


@pytest.mark.parametrize("group", ["model", "reward"])
def test_every_shipped_config_fits_its_loader(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        cfg = OmegaConf.load(path)
        fn, keys, required = loader_schema(cfg._target_, group)
        assert not set(keys) & set(RUNTIME), path
        assert set(cfg) - {"_target_"} <= set(keys), path  # no key the loader would not take
        for key in required:
            if OmegaConf.is_missing(cfg, key):  # `???`: the user sets it (model.name_or_path=...)
                cfg[key] = "x"
        assert check_loader_config(cfg, group, str(path)) is fn


def fake_loader(*, size: int, name_or_path: str = "x", cache_root=None):
    return size, name_or_path, cache_root


def test_call_loader_instantiates_a_partial_and_passes_only_the_runtime_arguments_named():
    cfg = OmegaConf.create({"_target_": f"{__name__}.fake_loader", "name": "fake", "size": 3})
    # `name` (an extra key of the group) is not passed; data_cfg/partitions are not parameters: not passed
    assert call_loader(cfg, "reward", cache_root="/c", data_cfg={"a": 1}, partitions={"train": []}) == (3, "x", "/c")
    with pytest.raises(ValueError, match=r"reward.sise: unknown key in the reward config .*did you mean 'size'"):
        call_loader(OmegaConf.merge(cfg, {"sise": 4}), "reward")
    with pytest.raises(ValueError, match=r"reward.size must be set: fake_loader"):
        call_loader(OmegaConf.create({"_target_": f"{__name__}.fake_loader"}), "reward")
    with pytest.raises(ValueError, match="reward._target_='nowhere.loader' cannot be imported"):
        call_loader({"_target_": "nowhere.loader"}, "reward")


def test_optional_nested_keys_may_be_left_out():
    cfg, choices = compose_train("~model.gpt2.dropout", "~model.sft.loss_on", "~reward.head")
    validate_config(cfg, choices)


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
                params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
                overrides += [f"{k}={str(v).split(',')[0].replace('range(5)', '0')}" for k, v in params.items()]
            if group == "transform" and path.stem == "raw":
                overrides.append("calibrator=passthrough")  # raw rewards go with the passthrough calibrator
            if group == "calibrator" and path.stem == "passthrough":
                overrides.append("transform=raw")
            yield overrides


# Refused with scale=smoke by design: its model and reward keys are model=tiny's and reward=trained's
# (conf/scale/smoke.yaml), and distill_rl distils 15 iterations of the smoke scale's 3
NOT_AT_SMOKE_SCALE = {"model=hf", "model=smollm2", "reward=hf", "solver=distill_rl"}


@pytest.mark.parametrize("overrides", list(shipped_options()), ids=" ".join)
def test_every_shipped_option_passes_the_schema_without_a_warning(overrides):
    from infalign.runtime.schema import check_config

    for scale in ([], ["scale=smoke"]):
        if scale and set(overrides) & NOT_AT_SMOKE_SCALE:
            continue
        cfg, choices = compose_train(*overrides, *scale)
        assert check_config(cfg, choices) == [], (overrides, scale)


def test_the_schema_refuses_distill_rl_at_the_smoke_scale():
    from infalign.runtime.schema import ConfigError, check_config

    cfg, choices = compose_train("solver=distill_rl", "scale=smoke")
    with pytest.raises(ConfigError, match=r"distill.iterations must be an integer from 0 to rl.iterations=3"):
        check_config(cfg, choices)


def test_every_key_of_train_yaml_is_in_the_schema():
    """A key the schema does not know is refused as a typo: every shipped key must be in it."""
    from infalign.runtime.schema import CLOSED, KEYS

    cfg, _ = compose_train()
    for section in CLOSED:
        for key in cfg[section]:
            assert f"{section}.{key}" in KEYS, f"{section}.{key}"
    for path, key in KEYS.items():  # and every key it requires is shipped
        if key.required:
            assert OmegaConf.select(cfg, path, default="<absent>") != "<absent>", path


def test_the_schema_mirrors_the_code_it_guards():
    """The schema imports no torch, so it repeats some of the code's constants: they must agree."""
    import inspect
    import typing

    import lightning
    import torch
    from lightning.fabric.plugins.precision import precision as lp
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from infalign.core.calibration import EmpiricalCalibrator, PassThroughCalibrator
    from infalign.core.losses import KL_PENALTY_MODES
    from infalign.models.data import PARTITIONS
    from infalign.models.pure_sampling import SAMPLERS
    from infalign.runtime import schema
    from infalign.trainer import schedules
    from infalign.trainer.solvers.rloo import ALGOS

    assert schema.KL_PENALTY_MODES == KL_PENALTY_MODES and schema.PARTITIONS == PARTITIONS
    assert schema.SAMPLERS == SAMPLERS
    cfg, _ = compose_train("logger=none")
    assert schema.RL_ALGOS == ALGOS and set(cfg.rl) == {p.split(".", 1)[1] for p in schema.KEYS if p.startswith("rl.")}
    precisions = {*typing.get_args(lp._PRECISION_INPUT_STR), *typing.get_args(lp._PRECISION_INPUT_STR_ALIAS),
                  *typing.get_args(lp._PRECISION_INPUT_INT)}
    assert set(schema.PRECISIONS) == precisions
    assert set(AcceleratorRegistry.available_accelerators()) <= set(schema.ACCELERATORS)
    trainer_params = [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]
    assert set(schema.TARGET_KEYS["trainer"]["lightning.Trainer"]) == set(trainer_params)
    for target, keys in schema.TARGET_KEYS["optimizer"].items():
        cls = getattr(torch.optim, target.rsplit(".", 1)[1])
        assert set(keys) == set(inspect.signature(cls).parameters) - {"params"}, target
    params = set(inspect.signature(schedules.warmup_cosine).parameters) - {"optimizer", "total_steps"}
    assert set(schema.TARGET_KEYS["scheduler"]["infalign.trainer.schedules.warmup_cosine"]) == params
    for target, keys in schema.TARGET_KEYS["transform"].items():
        module, name = target.rsplit(".", 1)
        fn = getattr(__import__(module, fromlist=[name]), name)
        assert set(keys) == set(inspect.signature(fn).parameters), target
    assert schema.CALIBRATORS == {"infalign.core.calibration.EmpiricalCalibrator": EmpiricalCalibrator.needs_reference,
                                  "infalign.core.calibration.PassThroughCalibrator":
                                      PassThroughCalibrator.needs_reference}
    for target in schema.TARGET_KEYS["transform"]:
        module, name = target.rsplit(".", 1)
        if name[0].isupper():  # a class (the factories build calibrated transforms)
            cls = getattr(__import__(module, fromlist=[name]), name)
            assert (target in schema.RAW_TRANSFORMS) == (not cls.needs_calibration), target


def test_the_schema_counts_optimizer_steps_as_the_solver_does():
    from infalign.runtime.schema import optimizer_steps
    from infalign.trainer.pieces import build_solver

    for overrides in ([], ["rl.algo=ppo"], ["solver=exact"], ["solver=distill_rl"], ["solver=distill", "scale=smoke"]):
        cfg, _ = compose_train(*overrides, "logger=none")  # the wandb logger's save_dir needs Hydra's runtime
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert optimizer_steps(plain) == build_solver(cfg).optimizer_steps(cfg.rl.iterations), overrides


@pytest.mark.parametrize("trainer, expected", [
    ({"devices": 2, "num_nodes": 3}, 6), ({"devices": "2"}, 2), ({"devices": [0, 1]}, 2), ({"devices": "0,1"}, 2),
    ({"devices": "auto"}, None), ({"devices": -1}, None), ({}, None)])
def test_processes(trainer, expected):
    from infalign.trainer.config import processes

    assert processes(OmegaConf.create(trainer)) == expected


@pytest.mark.parametrize("devices, ok", [
    (1, True), (8, True), (-1, True), ("auto", True), ("2", True), ([0, 1], True), ("0,1", True), ("1,", True),
    (0, False), (-2, False), ("0", False), ([], False), ([-1], False), ("gpu", False), (True, False), (1.5, False)])
def test_the_devices_rule_takes_what_lightning_takes(devices, ok):
    from infalign.runtime.schema import KEYS

    assert KEYS["trainer.devices"].rule.test(devices) is ok
