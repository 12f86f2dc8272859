import logging

import pytest
from hh_helpers import SHARED_DATA, synthetic_pairs, write_jsonl_gz

from infalign.models.data import (
    ASSISTANT,
    DataNotFoundError,
    load_partitions,
    parse_pair,
    parse_pairs,
    partition_by_prompt,
    partition_fingerprint,
    split_dialogue,
)
from infalign.models.prompt_text import hh_to_messages, truncate_prompt
from infalign.models.tokenizer import train_bpe_tokenizer

GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"}


def test_split_at_last_assistant_marker():
    prompt, response = split_dialogue(GOOD["chosen"])
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert response == " fine, thanks"
    rec = parse_pair(GOOD)
    assert (rec.prompt, rec.chosen, rec.rejected) == (prompt, " fine, thanks", " go away")
    assert rec.prompt_id == parse_pair(GOOD).prompt_id and len(rec.prompt_id) == 16


def test_broken_marker_records_are_dropped_and_counted(caplog):
    # As in 5 real harmless-base pairs: "  Human:" without the blank line moves the last Assistant turn.
    broken = {"chosen": "\n\nHuman: a\n\nAssistant: b  Human: c\n\nAssistant: d",
              "rejected": "\n\nHuman: a\n\nAssistant: e"}
    empty = {"chosen": "\n\nHuman: a\n\nAssistant:   ", "rejected": "\n\nHuman: a\n\nAssistant: x"}
    rows = [GOOD, broken, empty, {"chosen": "no turns", "rejected": "none"}, {"chosen": 3}, GOOD]
    with caplog.at_level(logging.WARNING, logger="infalign.models.data"):
        records, dropped = parse_pairs(rows, "unit")
    assert len(records) == 2
    assert dropped == {"prompt_mismatch": 1, "empty_response": 1, "no_assistant_turn": 1, "missing_field": 1}
    assert "dropped 4 of 6" in caplog.text and "prompt_mismatch=1" in caplog.text


@pytest.mark.skipif(not (SHARED_DATA / "harmless-base" / "test.jsonl.gz").is_file(), reason="shared data absent")
def test_real_harmless_base_counts():
    parts = load_partitions({"root": str(SHARED_DATA), "source": "local"})
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == 2312 - 9  # 5 prompt mismatches + 4 empty chosen responses (data README)
    assert sizes["train"] > 1800 and sizes["validation"] > 200 and sizes["test"] > 200


def _records(n=60, dup_every=7):
    rows = synthetic_pairs(n)
    for i in range(0, n, dup_every):  # a few prompts with two pairs each
        rows.append({"chosen": rows[i]["chosen"] + " more", "rejected": rows[i]["rejected"]})
    return parse_pairs(rows)[0]


def test_partition_deterministic_and_disjoint_by_prompt():
    recs = _records()
    fr = {"train": 0.6, "validation": 0.2, "test": 0.2}
    a, b = partition_by_prompt(recs, fr, seed=1), partition_by_prompt(list(reversed(recs)), fr, seed=1)
    assert {k: {r.prompt_id for r in v} for k, v in a.items()} == {k: {r.prompt_id for r in v} for k, v in b.items()}
    ids = {k: {r.prompt_id for r in v} for k, v in a.items()}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
    assert sum(len(v) for v in a.values()) == len(recs)
    assert [len(ids[k]) for k in ("train", "validation", "test")] == [36, 12, 12]  # exact cut over 60 prompts
    assert partition_fingerprint(a) == partition_fingerprint(partition_by_prompt(recs, fr, seed=1))
    c = partition_by_prompt(recs, fr, seed=2)
    assert partition_fingerprint(c) != partition_fingerprint(a)


@pytest.mark.parametrize("fr", [{"train": 0.9, "validation": 0.2}, {"train": 1.2, "test": -0.2}, {"training": 1.0}])
def test_bad_fractions_are_refused_by_the_config(fr):
    """partition_by_prompt trusts data.fractions: the config check is its one rule (tests/bad_input_cases.py runs it
    through train.py)."""
    from infalign.config.schema import DATA

    assert not DATA["fractions"].rule.test(fr)
    assert DATA["fractions"].rule.test({"train": 0.8, "validation": 0.1, "test": 0.1})


def test_truncation_keeps_final_marker_and_budget():
    turns = "".join(f"\n\nHuman: question number {i} is rather long and wordy\n\nAssistant: answer {i}" for i in range(20))
    prompt = turns + "\n\nHuman: and finally?" + ASSISTANT
    tok = train_bpe_tokenizer([prompt] * 3, vocab_size=300)
    for budget in (8, 25, 60):
        out = truncate_prompt(prompt, tok, budget)
        assert out.endswith(ASSISTANT) and prompt.endswith(out)
        assert len(tok(out)["input_ids"]) <= budget
    assert truncate_prompt(prompt, tok, 60).startswith("\n\n")  # cut at a turn boundary when one fits
    assert truncate_prompt("\n\nHuman: hi" + ASSISTANT, tok, 60) == "\n\nHuman: hi" + ASSISTANT
    with pytest.raises(ValueError, match="marker"):
        truncate_prompt(prompt, tok, 1)


def test_missing_local_root_names_both_options(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_partitions({"root": str(tmp_path / "nowhere"), "source": "local"})
    assert "INFALIGN_DATA_ROOT" in str(e.value) and "data.source=hub" in str(e.value)


def test_auto_falls_back_to_hub_and_explains_when_offline(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_partitions({"root": str(tmp_path / "nowhere"), "source": "auto"})
    msg = str(e.value)
    assert "no local file" in msg and "Anthropic/hh-rlhf" in msg and "INFALIGN_DATA_ROOT" in msg


def test_limit_and_jsonl_reading(tmp_path):
    root = tmp_path / "d"
    write_jsonl_gz(root / "synth" / "test.jsonl.gz", synthetic_pairs(50))
    parts = load_partitions({"root": str(root), "subsets": ["synth"], "limit": 20, "source": "local"})
    assert sum(len(v) for v in parts.values()) == 20


def test_hh_to_messages():
    msgs = hh_to_messages(split_dialogue(GOOD["chosen"])[0])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[-1]["content"] == "how are you?"
