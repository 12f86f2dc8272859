"""What rebuilds a model: the cache keys of the reference policy and the reward model, computed by their loaders
(as `python train.py` calls them) for the default config (model=tiny, reward=trained) on a synthetic data set.

The rollout length (`generation.max_new_tokens`), the prompt and sample counts (calibration, eval, rl) and the
run's own settings never enter them; the models' training truncation (`data.max_*_tokens`,
`reward.max_*_tokens`) does. Nothing is trained: the loaders are stopped where they would build.
"""

import pytest
from hh_helpers import synth_root  # noqa: F401  (fixture)
from hydra import compose, initialize_config_dir

import infalign.models.policy as policy_mod
import infalign.models.reward_train as reward_mod
from infalign.models.policy import load_policy
from infalign.models.reward import load_reward_model
from infalign.runtime.manifest import fingerprint
from infalign.runtime.paths import conf_dir

# changing any of these must leave both models' keys as they are (docs/training.md: "What rebuilds what")
RUN_ONLY = [
    ["generation.max_new_tokens=16"],
    ["generation.max_new_tokens=128", "generation.temperature=0.7"],
    ["data.train_prompts=16", "data.eval_prompts=8", "calibration.m=8"],
    ["eval.k=8", "eval.ns=[1,4]", "eval.every=5"],
    ["rl.k=8", "rl.prompts_per_iteration=4", "rl.iterations=2", "rl.algo=ppo", "rl.minibatch_size=8"],
    ["n=8", "beta=0.2", "seed=3", "optimizer.lr=3e-5"],
]


class _Stop(Exception):
    """Raised where a loader would build: carries the key it asked for."""


def _capture(cache_root, kind, key, build, **kwargs):
    raise _Stop(kind, key)


@pytest.fixture
def model_keys(synth_root, tmp_path, monkeypatch):  # noqa: F811
    """``keys(*overrides) -> {"policy": hash, "reward": hash, "cfg": cfg}`` for `train.yaml` + overrides."""
    monkeypatch.setattr(policy_mod, "get_or_build", _capture)  # the tokenizer is really built (milliseconds)
    monkeypatch.setattr(reward_mod, "get_or_build", _capture)
    data = [f"data.root={synth_root}", "data.subsets=[synth]", "data.source=local", f"cache_root={tmp_path / 'cache'}"]

    def keys(*overrides):
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("train", overrides=data + list(overrides))
        out = {"cfg": cfg}
        for kind, load in (("policy", lambda: load_policy(cfg.model, cfg.data, cfg.cache_root, progress=False)),
                           ("reward", lambda: load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root,
                                                                progress=False))):
            with pytest.raises(_Stop) as stop:
                load()
            assert stop.value.args[0] == kind
            out[kind] = fingerprint(stop.value.args[1])
        return out

    return keys


def test_the_rollout_length_is_its_own_key():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        default = compose("train")
        shorter_training = compose("train", overrides=["data.max_response_tokens=16"])
    assert default.generation.max_new_tokens == 64 == default.data.max_response_tokens  # today's lengths
    # the models' training truncation no longer sets the rollout length (it did through an interpolation)
    assert shorter_training.generation.max_new_tokens == 64


@pytest.mark.parametrize("overrides", RUN_ONLY, ids=lambda o: " ".join(o))
def test_rollout_length_and_run_sizes_rebuild_no_model(model_keys, overrides):
    base, changed = model_keys(), model_keys(*overrides)
    assert changed["policy"] == base["policy"] and changed["reward"] == base["reward"]


@pytest.mark.parametrize("overrides, rebuilt", [
    (["data.max_response_tokens=16"], {"policy", "reward"}),  # SFT targets and reward-training pairs
    (["data.max_prompt_tokens=96"], {"policy", "reward"}),
    (["reward.max_response_tokens=32"], {"reward"}),
    (["reward.train.epochs=3"], {"reward"}),
    (["model.sft.epochs=2"], {"policy"}),
], ids=lambda o: " ".join(o) if isinstance(o, list) else "")
def test_the_training_truncation_and_settings_rebuild_their_model(model_keys, overrides, rebuilt):
    base, changed = model_keys(), model_keys(*overrides)
    assert {k for k in ("policy", "reward") if changed[k] != base[k]} == rebuilt
    assert changed["cfg"].generation.max_new_tokens == base["cfg"].generation.max_new_tokens
