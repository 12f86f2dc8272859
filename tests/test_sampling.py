"""Rollouts, the calibration cache and evaluation sample from the model's own distribution (issue 12).

`model.generate` would apply whatever the checkpoint's `generation_config.json` sets (most instruct checkpoints
set a repetition penalty, n-gram bans, top-p, ...); `sampling.generate` must apply none of it. Each case saves a
tiny GPT-2 whose generation_config sets one such field to a real local folder and loads it back.
"""
import pytest
import torch
from hh_helpers import one_thread  # noqa: F401  (fixture)
from omegaconf import OmegaConf, open_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from infalign.core.losses import sequence_kl
from infalign.models.logprobs import response_logprobs
from infalign.models.pure_sampling import check_sampler_kwargs, sampling_kwargs
from infalign.models.sampling import generate

VOCAB, PAD, EOS = 64, 62, 63
MAX_NEW = 10
PROMPTS = ["w1 w2 w3 w4 w5", "w6", "w7 w8"]  # left padding, and k samples sharing each prompt's pass

# (generation_config settings of the checkpoint, id); warpers need do_sample=True to be saved at all
CHECKPOINT_SETTINGS = [
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"encoder_repetition_penalty": 1.3}, "encoder_repetition_penalty"),
    ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
    ({"min_new_tokens": MAX_NEW}, "min_new_tokens"),
    ({"min_length": 20}, "min_length"),
    ({"suppress_tokens": [3, 4, 5, PAD]}, "suppress_tokens"),
    ({"begin_suppress_tokens": [3, 4, 5]}, "begin_suppress_tokens"),
    ({"bad_words_ids": [[PAD]]}, "bad_words_ids"),
    ({"sequence_bias": [[[3], 5.0]]}, "sequence_bias"),
    ({"forced_eos_token_id": EOS}, "forced_eos_token_id"),
    ({"exponential_decay_length_penalty": (2, 1.5)}, "exponential_decay_length_penalty"),
    ({"renormalize_logits": True}, "renormalize_logits"),
    ({"guidance_scale": 2.0}, "guidance_scale"),
    ({"num_beams": 2}, "num_beams"),
    ({"do_sample": True, "epsilon_cutoff": 0.05}, "epsilon_cutoff"),
    ({"do_sample": True, "eta_cutoff": 0.1}, "eta_cutoff"),
    ({"do_sample": True, "top_k": 2}, "top_k"),
    ({"do_sample": True, "top_p": 0.3}, "top_p"),
    ({"do_sample": True, "min_p": 0.3}, "min_p"),
    ({"do_sample": True, "typical_p": 0.3}, "typical_p"),
    ({"do_sample": True, "temperature": 0.5}, "temperature"),
]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"<pad>": PAD, "<eos>": EOS})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):  # noqa: F811
    """`checkpoint(**settings)`: the same tiny GPT-2, its generation_config set so, saved and loaded back."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD))

    def load(**settings):
        folder = tmp_path_factory.mktemp("ckpt")
        base.generation_config = type(base.generation_config)(**settings)
        base.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for key in settings:  # the setting really is the checkpoint's own
            assert getattr(model.generation_config, key) is not None, key
        return model

    return load


@pytest.mark.parametrize("settings", [s for s, _ in CHECKPOINT_SETTINGS], ids=[i for _, i in CHECKPOINT_SETTINGS])
def test_rollouts_ignore_the_checkpoints_generation_config(checkpoint, tokenizer, settings):
    model = checkpoint(**settings)
    torch.manual_seed(1)
    rollout = generate(model, tokenizer, PROMPTS, 6, sampling_kwargs({"max_new_tokens": MAX_NEW}),
                       record_logprobs=True)
    # (c) the same weights with a neutral generation_config sample the very same tokens
    torch.manual_seed(1)
    neutral = generate(checkpoint(), tokenizer, PROMPTS, 6, sampling_kwargs({"max_new_tokens": MAX_NEW}))
    assert torch.equal(rollout.input_ids, neutral.input_ids)
    # (a) the log-probs recorded while sampling are the model's own, as a fresh forward pass scores them
    assert torch.isfinite(rollout.logprobs).all() and torch.isfinite(rollout.entropy).all()
    fresh, entropy = response_logprobs(model, rollout, with_entropy=True)
    mask = rollout.response_mask.bool()
    assert torch.allclose(rollout.logprobs[mask], fresh[mask], atol=1e-5)
    assert torch.allclose(rollout.entropy, entropy, atol=1e-4)
    # (b) at iteration 0 the policy is the reference: the k1 KL is 0 (not +0.35 nats, not NaN)
    kl = sequence_kl(rollout.logprobs, fresh, rollout.response_mask)
    assert torch.isfinite(kl["k1"]).all() and kl["k1"].abs().max() < 1e-4


@pytest.mark.parametrize("k", [1, 4])
def test_rows_that_end_leave_the_batch_without_changing_the_others(checkpoint, tokenizer, k):
    """Long enough that many rows end early (EOS is 1 of 64 tokens of a nearly uniform model) and the cache is
    compacted several times: the log-probs recorded while sampling are still those of a fresh pass, and
    nothing is recorded after a row's end."""
    model, max_new = checkpoint(), 40
    torch.manual_seed(5)
    ours = generate(model, tokenizer, PROMPTS, k, sampling_kwargs({"max_new_tokens": max_new}), record_logprobs=True)
    ended_early = (ours.lengths < ours.response_mask.shape[1]).float().mean()
    assert ended_early >= 0.25 or k == 1  # the premise: rows left the batch
    mask = ours.response_mask.bool()
    assert torch.allclose(ours.logprobs[mask], response_logprobs(model, ours)[mask], atol=1e-5)
    assert (ours.logprobs[~mask] == 0).all() and (ours.entropy[~mask] == 0).all()


def test_the_sampler_draws_from_the_distribution_it_is_given():
    """200k draws from a skewed distribution with rare and impossible tokens: frequencies within 4.5 standard
    errors of the probabilities (a fixed seed: deterministic), never an impossible token."""
    from infalign.models.sampling import _draw

    probs = torch.softmax(torch.linspace(0, 12, 64), 0)
    probs[[3, 40]] = 0.0
    probs[7] = 1e-6
    probs = probs / probs.sum()
    torch.manual_seed(0)
    n = 200_000
    counts = torch.zeros(64)
    for _ in range(n // 4000):
        counts += torch.bincount(_draw(probs.expand(4000, 64)), minlength=64)
    freq, se = counts / n, (probs * (1 - probs) / n).sqrt()
    assert counts[[3, 40]].sum() == 0
    assert ((freq - probs).abs() <= 4.5 * se + 1e-9).all(), (freq - probs).abs().max()


def test_the_sampler_is_seeded(checkpoint, tokenizer):
    model = checkpoint()
    torch.manual_seed(8)
    first = generate(model, tokenizer, PROMPTS, 4, sampling_kwargs({"max_new_tokens": 8}))
    torch.manual_seed(8)
    assert generate(model, tokenizer, PROMPTS, 4, sampling_kwargs({"max_new_tokens": 8})).input_ids.equal(first.input_ids)
    assert not generate(model, tokenizer, PROMPTS, 4, sampling_kwargs({"max_new_tokens": 8})).input_ids.equal(first.input_ids)


def test_response_logprobs_skip_padding_columns(checkpoint, tokenizer):
    """Columns past every row's response are not run, and the result is the same as over the full width."""
    model = checkpoint()
    torch.manual_seed(6)
    rollout = generate(model, tokenizer, PROMPTS, 4, sampling_kwargs({"max_new_tokens": 30}))
    wide = type(rollout)(torch.cat([rollout.input_ids, torch.full((12, 7), PAD)], 1),
                         torch.cat([rollout.attention_mask, torch.zeros(12, 7, dtype=torch.long)], 1),
                         torch.cat([rollout.response_mask, torch.zeros(12, 7, dtype=torch.long)], 1), rollout.prompt_len)
    narrow, padded = response_logprobs(model, rollout), response_logprobs(model, wide)
    assert padded.shape == (12, rollout.response_mask.shape[1] + 7)
    assert torch.allclose(padded[:, : narrow.shape[1]], narrow, atol=1e-6) and (padded[:, narrow.shape[1]:] == 0).all()


@pytest.mark.parametrize("settings", [{"epsilon_cutoff": 0.05}, {"top_k": 2}, {"min_p": 0.95}],
                         ids=["epsilon_cutoff", "top_k", "min_p"])
def test_sampling_is_not_truncated(checkpoint, tokenizer, settings):
    """The tiny model's next-token distribution is nearly uniform over 64 tokens (each below 0.05): pure
    sampling draws many distinct first tokens, a truncating warper only one or two."""
    model = checkpoint(do_sample=True, **settings)
    torch.manual_seed(2)
    rollout = generate(model, tokenizer, ["w1 w2"], 48, sampling_kwargs({"max_new_tokens": 1}))
    probs = torch.softmax(model(**tokenizer(["w1 w2"], return_tensors="pt")).logits[0, -1], -1)
    assert probs.max() < 0.05  # the premise
    assert rollout.response_ids[:, 0].unique().numel() > 10


def test_checkpoint_max_length_does_not_cut_max_new_tokens(checkpoint, tokenizer):
    model = checkpoint(max_length=5)
    torch.manual_seed(3)
    rollout = generate(model, tokenizer, PROMPTS, 6, sampling_kwargs({"max_new_tokens": 12}))
    assert rollout.response_ids.shape[1] == 12


def test_checkpoint_cache_implementation_leaves_the_shared_prompt_cache_alone(checkpoint, tokenizer):
    model = checkpoint(cache_implementation="static")  # would clash with the k samples' shared prompt cache
    torch.manual_seed(4)
    rollout = generate(model, tokenizer, PROMPTS, 3, sampling_kwargs({"max_new_tokens": 6}), record_logprobs=True)
    assert torch.allclose(rollout.logprobs, response_logprobs(model, rollout), atol=1e-5)


def test_generate_refuses_what_would_still_change_the_probabilities(checkpoint, tokenizer):
    model = checkpoint()
    # settings passed in without the config check (which refuses them): named, never silently dropped
    with pytest.raises(ValueError, match=r"temperature=0\.7 would change the sampling distribution"):
        generate(model, tokenizer, PROMPTS, 2, sampling_kwargs({"temperature": 0.7}))
    with pytest.raises(ValueError, match="no_repeat_ngram_size=3 is not one it knows"):
        generate(model, tokenizer, PROMPTS, 2, sampling_kwargs({"no_repeat_ngram_size": 3}))
    with pytest.raises(ValueError, match="not one it knows"):
        generate(model, tokenizer, PROMPTS, 2, {"max_new_tokens": 3, "length_penalty": 2.0})
    # a run config saved before generation.sampler was removed may name another sampler
    with pytest.raises(ValueError, match="sampler='multinomial' is not how it draws"):
        generate(model, tokenizer, PROMPTS, 2, sampling_kwargs({"max_new_tokens": 3, "sampler": "multinomial"}))


REFUSED = [("repetition_penalty", 1.3), ("encoder_repetition_penalty", 1.2), ("no_repeat_ngram_size", 2),
           ("encoder_no_repeat_ngram_size", 2), ("min_length", 5), ("min_new_tokens", 5), ("suppress_tokens", [3]),
           ("begin_suppress_tokens", [3]), ("bad_words_ids", [[3]]), ("sequence_bias", [[[3], 1.0]]),
           ("forced_bos_token_id", 1), ("forced_eos_token_id", 2), ("epsilon_cutoff", 0.05), ("eta_cutoff", 0.1),
           ("typical_p", 0.9), ("min_p", 0.1), ("top_h", 0.5), ("exponential_decay_length_penalty", [2, 1.5]),
           ("renormalize_logits", True), ("remove_invalid_values", True), ("guidance_scale", 2.0),
           ("watermarking_config", {"bias": 2.0}), ("num_beams", 2), ("do_sample", False), ("penalty_alpha", 0.6)]


@pytest.fixture(scope="module")
def default_config():
    from hydra import compose, initialize_config_dir

    from infalign.runtime.paths import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none"], return_hydra_config=True)
    return cfg, OmegaConf.to_container(cfg.hydra.runtime.choices)


@pytest.mark.parametrize(("key", "value"), REFUSED, ids=[k for k, _ in REFUSED])
def test_a_probability_changing_setting_is_refused_by_the_config_check_and_by_the_sampler(key, value,
                                                                                             default_config):
    """The config check refuses it in one line before torch (`python train.py +generation.<key>=...`);
    `sampling_kwargs` passes on what a caller gives it unchecked, and the sampler refuses it, never dropping it."""
    from infalign.config import ConfigError
    from infalign.config.check import check_config

    cfg, choices = default_config
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.generation[key] = value
    with pytest.raises(ConfigError, match=rf"^generation\.{key}: unknown key .*would change the sampling "
                                          "distribution") as err:
        check_config(cfg, choices, overrides=[])
    assert "\n" not in str(err.value)
    assert sampling_kwargs({key: value})[key] == value
    with pytest.raises(ValueError, match=rf"{key}=.* would change the sampling distribution|not one it knows"):
        check_sampler_kwargs(sampling_kwargs({key: value}))
