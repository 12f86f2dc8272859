"""Helpers and fixtures for the data / model-building tests (imported by those test modules).

Kept out of conftest.py so that these fixtures travel with the tests that use them. Offline mode for the
HF libraries is set in conftest.py before anything imports them.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"
TOPICS = ["bread", "cats", "taxes", "chess", "rain", "music", "tea", "boats", "maps", "glue", "bees", "kites"]


def synthetic_pairs(n: int = 96) -> list[dict]:
    """An easy preference set: the chosen answer is polite and on topic, the rejected one rude."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"\n\nHuman: Tell me about {topic}, question {i}.\n\nAssistant:"
        good = f" Sure, I am happy to help with {topic}. Here is a kind and careful answer."
        bad = f" No. {topic} is stupid and so are you, go away now!"
        rows.append({"chosen": prompt + good, "rejected": prompt + bad})
    return rows


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def compose(overrides: list[str]):
    """``conf/build.yaml`` composed with ``overrides`` (as ``python -m infalign.models.build`` would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from infalign.runtime.paths import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose(config_name="build", overrides=overrides)


@pytest.fixture
def synth_root(tmp_path) -> Path:
    """A data root laid out like upstream HH-RLHF: <root>/synth/test.jsonl.gz."""
    root = tmp_path / "data"
    write_jsonl_gz(root / "synth" / "test.jsonl.gz", synthetic_pairs())
    return root


def tiny_overrides(root: Path, cache: Path) -> list[str]:
    return ["scale=smoke", f"data.root={root}", "data.subsets=[synth]", "data.source=local", f"cache_root={cache}"]


@pytest.fixture
def tiny_cfg(synth_root, tmp_path):
    """The seconds-sized preset on the synthetic set, with a private cache."""
    return compose(tiny_overrides(synth_root, tmp_path / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Seconds-sized models gain nothing from a second thread, and on a busy 2-core machine the OpenMP
    threads of two processes fight each other (several-fold slowdowns): use one, restore afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """``(cfg, summary)`` of one tiny build (policy + fine-tuned GPT-2 reward) shared by a test module."""
    from infalign.models.build import build_all

    tmp = tmp_path_factory.mktemp("built")
    write_jsonl_gz(tmp / "data" / "synth" / "test.jsonl.gz", synthetic_pairs())
    cfg = compose(tiny_overrides(tmp / "data", tmp / "cache") + ["reward.train.epochs=4"])
    return cfg, build_all(cfg, progress=False)
