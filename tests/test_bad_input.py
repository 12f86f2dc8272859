"""Bad input: every case is a clear error naming the key and what is accepted, raised before any model is built.

`run()` is called in-process on the smoke config with a private cache root, and must fail without creating
any model cache (tokenizer, policy, reward) there. README "Errors you may see" lists the same table.
"""

import math
import time
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from test_reliability import plant_pickle

from infalign.runtime.checkpoint_io import SafeCheckpointIO
from infalign.runtime.paths import conf_dir
from infalign.trainer.inprocess import compose_run_config
from infalign.trainer.run import _check_context, run

SMOKE = ["scale=smoke", "progress=false", "logger=none", "num_threads=1"]


def corrupt_checkpoint(run_dir):
    path = run_dir / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"epoch": 1, "state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1000])


def malicious_checkpoint(run_dir):
    plant_pickle(run_dir / "checkpoints" / "last.ckpt", run_dir / "PWNED")


def finished_run(run_dir):
    (run_dir / "final_metrics.json").write_text("{}")


CASES = [  # (overrides, setup of the run dir, expected error text)
    (["n=0"], None, "n must be >= 1"),
    (["n=2.5"], None, "n must be a positive integer"),
    (["n=abc"], None, "n must be a positive integer .* got 'abc'"),
    (["beta=0"], None, "beta .*must be a positive finite number"),
    (["beta=-1"], None, "beta .*must be a positive finite number"),
    (["transform=bon_exp", "transform.t=-1"], None, "bon_exp: `t` must be a positive finite number.*transform.t"),
    (["transform=won_exp", "transform.t=-1"], None, "won_exp: `t` must be a positive finite number.*transform.t"),
    (["calibration.m=2"], None, "calibration.m=2 is below N=4"),
    (["rl.k=1"], None, "rl.k must be an integer >= 2"),
    (["rl.algo=dpo"], None, "rl.algo must be 'rloo' or 'ppo'"),
    (["+model.tokenzier=1"], None, "model.tokenzier: unknown key in conf/model/tiny.yaml .*; known keys: .*tokenizer"),
    (["+model.sft.lrr=1"], None, "model.sft.lrr: unknown key in conf/model/tiny.yaml .*; known keys: .*lr"),
    (["+reward.bakbone=minilm"], None,
     "reward.bakbone: unknown key in conf/reward/trained.yaml .*; known keys: .*backbone"),
    (["model.prompt_format=plain"], None, "model.prompt_format must be one of 'raw', 'chat', got 'plain'"),
    (["reward.backbone=bert"], None, "reward.backbone must be one of 'minilm', .*got 'bert'"),
    (["model=smollm2"], None,  # the smoke scale's model keys are model=tiny's
     "model.tokenizer: unknown key in conf/model/smollm2.yaml \\(as composed with conf/scale/smoke"),
    (["calibration.eval_partition=train"], None, "calibration.eval_partition must be a held-out partition"),
    (["generation.temperature=0.7"], None, "sample from the policy itself"),
    (["data.root=/nonexistent"], None, "no local file at /nonexistent.*data.root.*data.source=hub"),
    (["data.root=/nonexistent", "data.source=local"], None, "not found: /nonexistent.*data.root.*data.source=hub"),
    (["resume=maybe"], None, "resume must be true, false or auto"),
    (["checkpoint.every=-1"], None, "checkpoint.every must be an integer >= 0"),
    (["resume=true"], None, "resume=true but .*last.ckpt does not exist"),
    ([], finished_run, "already holds a run's outputs .*resume=true.*overwrite=true"),
    (["resume=true"], corrupt_checkpoint, "last.ckpt .*(corrupted or truncated|cannot be read).*overwrite=true"),
    (["resume=auto"], malicious_checkpoint, "refusing to unpickle it"),
]


@pytest.mark.parametrize("overrides, setup, match", CASES, ids=[" ".join(c[0]) or c[1].__name__ for c in CASES])
def test_bad_input_fails_fast_before_any_model(tmp_path, overrides, setup, match):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_dir.mkdir()
    if setup:
        setup(run_dir)
    cfg = compose_run_config([*SMOKE, f"cache_root={cache}", *overrides], run_dir)
    started = time.time()
    with pytest.raises(Exception, match=match):
        run(cfg)
    assert time.time() - started < 30  # seconds, even on a busy machine: nothing was built or trained
    assert not cache.exists() or not any(cache.iterdir()), "a model cache was created before the error"
    assert not (run_dir / "PWNED").exists()  # the planted pickle never ran


def test_unknown_config_option_lists_the_accepted_ones():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose("train", overrides=["transform=foo"])
    for option in ("bon_exp", "won_exp", "identity", "log", "optimal", "raw"):
        assert option in err.value.options


def test_prompt_plus_response_longer_than_the_context_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(n_positions=32))
    cfg = OmegaConf.create({"data": {"max_prompt_tokens": 48}, "generation": {"max_new_tokens": 16}})
    with pytest.raises(ValueError, match="data.max_prompt_tokens \\+ generation.max_new_tokens = 64 exceeds .* 32"):
        _check_context(model, cfg)
    cfg.data.max_prompt_tokens = 16
    _check_context(model, cfg)  # 32 tokens fit


def test_tokenizer_without_pad_token(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from infalign.models.policy import _generation_ready

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        _generation_ready(bare)
    with_eos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
                                       eos_token="</s>")
    assert _generation_ready(with_eos).pad_token == "</s>"  # the usual stand-in


class NaNReward:
    """A reward model that returns NaN for every response to the second prompt."""

    def __init__(self, bad_prompt: str):
        self.bad_prompt = bad_prompt

    def score(self, prompts, responses):
        return torch.tensor([math.nan if p == self.bad_prompt else 0.5 for p in prompts])


def test_non_finite_rewards_name_the_prompt_and_nothing_is_cached(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.tokenizer import train_bpe_tokenizer
    from infalign.runtime.artifacts import entry_path
    from infalign.trainer.calibration_cache import load_or_build_reference_samples

    tok = train_bpe_tokenizer(["Human: hi there. Assistant: hello friend"] * 8, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    prompts = ["Human: hi. Assistant:", "Human: the poisoned prompt. Assistant:", "Human: bye. Assistant:"]
    key = {"test": "nan"}
    with pytest.raises(ValueError, match="non-finite score.*the poisoned prompt"):
        load_or_build_reference_samples(cache_root=tmp_path, key=key, prompt_ids=["a", "b", "c"], prompts=prompts,
                                        reward_prompts=prompts, reference=model, tokenizer=tok,
                                        reward_model=NaNReward(prompts[1]), m=2,
                                        gen_kwargs=sampling_kwargs({"max_new_tokens": 4}), seed=0, progress=False)
    kind_dir = entry_path(tmp_path, "reference_samples", key).parent
    assert list(kind_dir.iterdir()) == []  # no entry, no temp dir: the next run rebuilds from scratch
