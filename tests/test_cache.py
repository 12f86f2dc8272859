import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from infalign.runtime.artifacts import get_or_build, lookup
from infalign.runtime.manifest import MANIFEST, entry_path, fingerprint, key_changes, verify_entry


def test_fingerprint_canonical():
    a = {"b": [1, 2, {"x": 0.5}], "a": "s", "p": Path("/x")}
    b = {"p": "/x", "a": "s", "b": [1, 2, {"x": 0.5}]}
    assert fingerprint(a) == fingerprint(b) == fingerprint(OmegaConf.create(b))
    assert fingerprint(a) != fingerprint({**b, "a": "t"})
    assert fingerprint({"n": 1}) != fingerprint({"n": 1.0})
    assert len(fingerprint(a)) == 16 and len(fingerprint(a, length=0)) == 64
    with pytest.raises(TypeError):
        fingerprint({"o": object()})
    with pytest.raises(ValueError):
        fingerprint({"f": float("nan")})


class Builder:
    def __init__(self):
        self.calls = 0

    def __call__(self, out: Path):
        self.calls += 1
        (out / "weights.bin").write_bytes(b"\x00\x01" * 1000)
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text('{"a": 1}')
        return {"acc": 0.75}


def test_miss_then_hit(tmp_path):
    b = Builder()
    e1 = get_or_build(tmp_path, "thing", {"k": 1}, b)
    assert not e1.hit and b.calls == 1 and e1.meta == {"acc": 0.75}
    assert e1.path == tmp_path / "thing" / fingerprint({"k": 1})
    manifest = json.loads((e1.path / MANIFEST).read_text())
    assert manifest["key"] == {"k": 1} and set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    e2 = get_or_build(tmp_path, "thing", {"k": 1}, b)
    assert e2.hit and b.calls == 1 and e2.path == e1.path and e2.meta == {"acc": 0.75}
    assert [p.name for p in (tmp_path / "thing").iterdir()] == [e1.path.name]  # no temp dirs left


def test_changed_key_is_a_new_entry(tmp_path):
    b = Builder()
    e1 = get_or_build(tmp_path, "thing", {"k": 1}, b)
    e2 = get_or_build(tmp_path, "thing", {"k": 2}, b)
    assert e1.path != e2.path and b.calls == 2 and e1.path.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra", "manifest", "no_manifest"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, caplog, damage):
    b = Builder()
    path = get_or_build(tmp_path, "thing", {"k": 1}, b).path
    w = path / "weights.bin"
    if damage == "flip":
        data = bytearray(w.read_bytes())
        data[10] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "delete":
        w.unlink()
    elif damage == "extra":
        (path / "stray.tmp").write_text("x")
    elif damage == "manifest":
        (path / MANIFEST).write_text("{not json")
    else:
        (path / MANIFEST).unlink()  # what an interrupted non-atomic build would leave
    assert not verify_entry(path, {"k": 1})[0]
    with caplog.at_level(logging.WARNING, logger="infalign.runtime.artifacts"):
        e = get_or_build(tmp_path, "thing", {"k": 1}, b)
    assert not e.hit and b.calls == 2 and "invalid" in caplog.text
    assert verify_entry(e.path, {"k": 1})[0]


def test_manifest_key_mismatch_is_rejected(tmp_path):
    path = get_or_build(tmp_path, "thing", {"k": 1}, Builder()).path
    m = json.loads((path / MANIFEST).read_text())
    m["key"] = {"k": 99}
    (path / MANIFEST).write_text(json.dumps(m))
    assert lookup(tmp_path, "thing", {"k": 1}) is None and not path.exists()


def test_failed_build_leaves_nothing(tmp_path):
    def boom(out: Path):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        get_or_build(tmp_path, "thing", {"k": 1}, boom)
    assert not entry_path(tmp_path, "thing", {"k": 1}).exists()
    assert list((tmp_path / "thing").iterdir()) == []


def test_invalid_kind(tmp_path):
    with pytest.raises(ValueError):
        get_or_build(tmp_path, "../x", {"k": 1}, Builder())


def _rebuild_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("rebuilding ")]


def test_a_miss_beside_an_entry_names_the_changed_keys_before_building(tmp_path, caplog):
    old = {"kind": "bt", "version": 1, "train": {"epochs": 30, "lr": 1e-3}, "max_response_tokens": 64, "data": "aa"}
    new = {**old, "train": {"epochs": 3, "lr": 1e-3}, "max_response_tokens": 16}
    sources = {"max_response_tokens": "data.max_response_tokens", "train": "reward.train"}
    first = get_or_build(tmp_path, "thing", old, Builder(), sources=sources)
    caplog.clear()
    seen_at_build = []

    def build(out: Path):  # what had been logged when the (long) build starts
        seen_at_build.extend(_rebuild_messages(caplog))
        return Builder()(out)

    with caplog.at_level(logging.INFO, logger="infalign.runtime.artifacts"):
        get_or_build(tmp_path, "thing", new, build, sources=sources)
    assert len(seen_at_build) == 1, caplog.text
    msg = seen_at_build[0]
    assert msg.startswith("rebuilding thing: keys ")
    assert "max_response_tokens (data.max_response_tokens) changed from 64 to 16" in msg
    assert "train.epochs (reward.train.epochs) changed from 30 to 3" in msg
    assert msg.count(" changed from ") == 2  # only the keys that changed
    assert f"(entry {first.hash})" in msg and "this takes about" in msg
    assert [r.levelno for r in caplog.records if r.getMessage() == msg] == [logging.WARNING]


def test_the_rebuild_message_compares_with_the_nearest_entry_of_the_same_key_kind(tmp_path, caplog):
    near = get_or_build(tmp_path, "thing", {"kind": "a", "x": 1, "y": 1, "z": [1, 2]}, Builder())
    get_or_build(tmp_path, "thing", {"kind": "a", "x": 2, "y": 2, "z": [1, 2]}, Builder())
    get_or_build(tmp_path, "thing", {"kind": "b", "x": 1, "y": 1, "z": [1, 2, 3]}, Builder())  # another model type
    get_or_build(tmp_path, "thing", {"kind": "a", "x": 1, "y": 1, "z": [1, 2, 3], "stream": "pool"}, Builder())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infalign.runtime.artifacts"):
        get_or_build(tmp_path, "thing", {"kind": "a", "x": 1, "y": 1, "z": [1, 2, 3]}, Builder())
    (msg,) = _rebuild_messages(caplog)
    assert msg.startswith("rebuilding thing: key z changed from [1, 2] to [1, 2, 3]") and f"(entry {near.hash})" in msg


def test_no_rebuild_message_on_a_first_build_or_a_hit(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="infalign.runtime.artifacts"):
        get_or_build(tmp_path, "thing", {"kind": "a", "x": 1}, Builder())
        get_or_build(tmp_path, "other", {"kind": "a", "x": 2}, Builder())  # another cache kind is not compared
        assert get_or_build(tmp_path, "thing", {"kind": "a", "x": 1}, Builder()).hit
    assert _rebuild_messages(caplog) == [] and "cache miss: thing/" in caplog.text


def test_key_changes_lists_changed_added_and_removed_leaves():
    assert key_changes({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 1, "c": 3}, "e": 1}) == [
        ("a.c", 2, 3), ("d", 1, "(absent)"), ("e", "(absent)", 1)]
    assert key_changes({"n": 1}, {"n": 1.0}) == [("n", 1, 1.0)]  # as the fingerprint tells them apart
    assert key_changes({"a": [1]}, {"a": [1]}) == []
