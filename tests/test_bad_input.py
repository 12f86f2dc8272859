"""Bad input: every case is a clear error naming the key and what is accepted, raised before any model is built.

The cases are one table, tests/bad_input_cases.py (also read by bench/config_check_time.py and mirrored by
docs/errors.md's "Errors you may see"). `run()` is called in-process on the smoke config with a private cache root for
every case, and must fail without creating any model cache (tokenizer, policy, reward) there; the schema's cases
also fail `python train.py` at once: exit status 2, one line, no traceback, torch never imported.
"""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bad_input_cases import CASES, FINE, WARNINGS
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict
from test_file_errors import read_only_mount
from test_reliability import plant_pickle

from infalign.config import ConfigError
from infalign.config.check import check_config
from infalign.runtime.checkpoint_io import SafeCheckpointIO
from infalign.runtime.paths import conf_dir
from infalign.trainer.inprocess import compose_run_config, run_checked
from infalign.trainer.pieces import check_context as _check_context

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["scale=smoke", "progress=false", "logger=none", "num_threads=1"]


# ------------------------------------------------------------------- setups: (run_dir, cache=, monkeypatch=)
def corrupt_checkpoint(run_dir, **_):
    path = run_dir / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"epoch": 1, "state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1000])


def malicious_checkpoint(run_dir, **_):
    plant_pickle(run_dir / "checkpoints" / "last.ckpt", run_dir / "PWNED")


def finished_run(run_dir, **_):
    (run_dir / "final_metrics.json").write_text("{}")


def read_only_cache(run_dir, *, cache, monkeypatch):
    """An empty cache root on a read-only mount (simulated: root ignores permission bits)."""
    assert read_only_mount(cache.parent, monkeypatch)["file"] == cache


def prepare(case, tmp_path, monkeypatch):
    """The case's private run directory and cache root, broken as its `setup` says."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_dir.mkdir()
    if case.setup:
        globals()[case.setup](run_dir, cache=cache, monkeypatch=monkeypatch)
    return run_dir, cache


def ids(cases):
    return [c.name for c in cases]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bad_input_fails_fast_before_any_model(tmp_path, monkeypatch, case):
    run_dir, cache = prepare(case, tmp_path, monkeypatch)
    cfg = compose_run_config([*SMOKE, f"cache_root={cache}", *case.overrides], run_dir)
    started = time.time()
    with pytest.raises(Exception, match=case.match) as err:
        run_checked(cfg)  # what train.py runs: the config check, then run()
    assert time.time() - started < 30  # seconds, even on a busy machine: nothing was built or trained
    assert not cache.exists() or not any(cache.iterdir()), "a model cache was created before the error"
    assert not (run_dir / "PWNED").exists()  # the planted pickle never ran
    assert isinstance(err.value, ConfigError), type(err.value)  # train.py prints every one of them as one line
    assert "\n" not in str(err.value)


def compose_job(overrides):
    """`(cfg, choices)` as `python train.py` hands them to its job (no `hydra` node)."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*SMOKE, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as train.py has it (a study's beta reads the method chosen)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


SCHEMA_CASES = [c for c in CASES if c.stage == "schema"]


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=ids(SCHEMA_CASES))
def test_the_schema_alone_refuses_it(tmp_path, monkeypatch, case):
    """What train.py checks before importing torch: the schema, on the composed config."""
    _, cache = prepare(case, tmp_path, monkeypatch)
    cfg, choices = compose_job([f"cache_root={cache}", *case.overrides])
    with pytest.raises(ConfigError, match=case.match) as err:
        check_config(cfg, choices)
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize("case", [c for c in CASES if c.stage != "schema"], ids=ids([c for c in CASES if c.stage != "schema"]))
def test_the_schema_leaves_it_to_the_later_checks(tmp_path, monkeypatch, case):
    """The table's stage is where the case is refused: not earlier (the stage column would be wrong)."""
    _, cache = prepare(case, tmp_path, monkeypatch)
    cfg, choices = compose_job([f"cache_root={cache}", *case.overrides])
    check_config(cfg, choices)


@pytest.mark.parametrize("case", WARNINGS, ids=ids(WARNINGS))
def test_valid_but_pointless_values_warn(case):
    cfg, choices = compose_job(case.overrides)
    warnings = check_config(cfg, choices)
    assert any(re.search(case.match, w) for w in warnings), warnings


@pytest.mark.parametrize("case", FINE, ids=ids(FINE))
def test_valid_values_that_look_pointless_pass_silently(case):
    cfg, choices = compose_job(case.overrides)
    assert check_config(cfg, choices) == []


def test_every_case_is_in_the_docs_errors_table():
    text = (REPO / "docs" / "errors.md").read_text()
    section = text.split("\n## Errors you may see", 1)[1].split("\n## ", 1)[0]
    for c in CASES + WARNINGS:
        names = [c.label] if c.label else [f"`{o}`" for o in c.overrides]
        missing = [n for n in names if n not in section]
        assert not missing, f"docs/errors.md 'Errors you may see' lacks {missing} (case {c.name})"


# ------------------------------------------------------------------------------------------- python train.py
def train_py(*overrides, env=None, importtime=False):
    """`python train.py scale=smoke logger=none <overrides>` in a subprocess; `importtime`: stderr lists every
    module imported (python -X importtime), so a test can see whether torch was."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), str(REPO / "train.py"), "scale=smoke",
           "logger=none", *overrides]
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    return out, time.time() - started


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


# the user's reports (issue 17), refused by the schema; and a missing local model folder (refused after torch's
# import until the schema checked it)
SUBPROCESS_CASES = [c for c in SCHEMA_CASES if c.overrides in (
    ("optimizer.lr=-1",), ("seed=abc",), ("eval.ns=[0]",), ("trainer.max_epochs=5",),
    ("+trainer.accumulate_grad_batches=2",), ("num_threads=0",), ("model=hf", "model.name_or_path=/nonexistent"))]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=ids(SUBPROCESS_CASES))
def test_train_py_refuses_it_in_one_line_before_importing_torch(tmp_path, case):
    out, seconds = train_py(*case.overrides, f"hydra.run.dir={tmp_path}", importtime=True)
    assert out.returncode == 2, out.stderr[-2000:]
    messages = [line.removeprefix("error: ") for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1 and re.search(case.match, messages[0]), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr
    modules = imported(out.stderr)
    assert "hydra" in modules  # the import log works, so the next line can fail
    assert not {m for m in modules if m.split(".")[0] in ("torch", "lightning", "transformers", "numpy")}
    assert seconds < 30  # a sanity bound only; bench/config_check_time.py measures the time


def test_hydra_full_error_shows_the_traceback(tmp_path):
    out, _ = train_py("seed=abc", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError: seed must be an integer" in out.stderr


def test_a_later_config_check_is_one_line_too(tmp_path):
    """An optimizer's unknown key is found after torch is imported (the class's parameters), still as one line."""
    case = next(c for c in CASES if c.overrides == ("+optimizer.weight_decy=0.1",))
    out, _ = train_py(*case.overrides, f"hydra.run.dir={tmp_path}", env={"INFALIGN_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(case.match, out.stderr) and "Traceback" not in out.stderr


def test_a_moved_key_is_refused_in_one_line_before_hydra(tmp_path):
    out, _ = train_py("calibration.eval_prompts=8", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == "error: calibration.eval_prompts moved to data.eval_prompts; e.g. data.eval_prompts=8"


def test_importing_the_schema_imports_no_torch():
    code = ("import sys, infalign.config.check, infalign.config.__main__; "
            "heavy = [m for m in ('torch', 'lightning', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_unknown_config_option_lists_the_accepted_ones():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose("train", overrides=["transform=foo"])
    for option in ("bon_exp", "won_exp", "identity", "log", "optimal", "raw"):
        assert option in err.value.options


def test_prompt_plus_response_longer_than_the_context_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(n_positions=32))
    cfg = OmegaConf.create({"data": {"max_prompt_tokens": 48}, "generation": {"max_new_tokens": 16},
                            "model": {"_target_": "infalign.models.policy.hf_policy"}})
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
    from infalign.runtime.manifest import entry_path
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
