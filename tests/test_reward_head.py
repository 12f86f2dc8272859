"""reward=hf refuses a folder whose weights lack the classification head (a causal LM): transformers would
initialise the head at random, and the run would train on noise and exit 0."""
import re

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from infalign.models.reward import hf_reward, load_reward_model
from infalign.runtime.errors import ConfigError


def save_tiny(model_cls, folder, **config):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2},
                                                                              unk_token="a")),
                                  eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    model_cls(GPT2Config(vocab_size=3, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=2,
                         eos_token_id=2, pad_token_id=2, **config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_causal_lm_folder_is_refused_naming_the_folder_and_the_head(tmp_path):
    folder = str(save_tiny(GPT2LMHeadModel, tmp_path / "lm"))
    with pytest.raises(ConfigError) as err:
        hf_reward(name_or_path=folder)
    message = str(err.value)
    assert "\n" not in message  # train.py prints a ConfigError as one line `error: ...`, exit status 2
    assert re.search(rf"^reward\.name_or_path={re.escape(folder)}: it holds GPT2LMHeadModel, whose weights lack "
                     r"score\.weight .*AutoModelForSequenceClassification with num_labels=1", message), message
    # the same through the config loader the trainer calls
    with pytest.raises(ConfigError, match="lack score.weight"):
        load_reward_model({"_target_": "infalign.models.reward.hf_reward", "name_or_path": folder}, progress=False)


def test_a_sequence_classifier_folder_loads_and_scores(tmp_path):
    folder = str(save_tiny(GPT2ForSequenceClassification, tmp_path / "rm", num_labels=1))
    rm, _ = hf_reward(name_or_path=folder)
    scores = rm.score(["a b", "b"], [" a", " b b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
