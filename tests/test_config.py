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
    assert sorted(p.stem for p in (CONF / "scale").glob("*.yaml")) == ["smoke"]
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
