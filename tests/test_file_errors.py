"""Every file the project reads or writes fails with a message naming the file, the cause and what to do; a stop
signal at any stage says what was stopped and what to run next (issue 17, part 2).

One table, `CASES` (docs/errors.md's "File and signal errors" table lists the same failures): how the file or the
environment is broken, the stage that meets it, and a regex the message must match, naming the file and the
cause. A full disk and a read-only mount are simulated (root ignores permission bits, and a test cannot fill a
disk); permission bits are also tested for real where the tests do not run as root. The signal cases send the
signal to `python train.py` (tests/test_faults.py's `start`) once the stage has begun.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hh_helpers import synthetic_pairs, write_jsonl_gz
from test_faults import ARGS, REPO, start

import infalign.runtime.checkpoint_io as checkpoint_io
from infalign.models.data import load_partitions
from infalign.models.loaders import check_loader_config
from infalign.runtime.artifacts import get_or_build
from infalign.runtime.atomic import atomic_write_json
from infalign.runtime.loggers import ResumableCSVLogger

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------- ways to break things
def data_root(tmp: Path, damage: Callable[[bytes], bytes]) -> dict:
    """A data root laid out like ../shared/data/hh-rlhf (synthetic pairs), its one file damaged."""
    path = write_jsonl_gz(tmp / "data" / "synth" / "test.jsonl.gz", synthetic_pairs(400))
    path.write_bytes(damage(path.read_bytes()))
    return {"file": path, "data_cfg": {"root": str(tmp / "data"), "subsets": ["synth"], "source": "local"}}


def truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]  # as a copy cut off by a full disk or a killed download


def flipped(raw: bytes) -> bytes:
    return raw[:200] + bytes(b ^ 0xFF for b in raw[200:260]) + raw[260:]  # bit rot inside the compressed stream


def not_utf8(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(b'{"chosen": "\xff\xfe latin-1?"}\n')


class FillsUp:
    """A file on a disk that fills up after `room` bytes (what `write` raises on a full disk)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def full_disk_for_checkpoints(tmp: Path, monkeypatch) -> dict:
    real = checkpoint_io.atomic_write

    def on_a_full_disk(path, write, before_replace=None):
        return real(path, lambda f: write(FillsUp(f, room=4096)), before_replace)

    monkeypatch.setattr(checkpoint_io, "atomic_write", on_a_full_disk)
    return {"file": tmp / "run" / "checkpoints" / "last.ckpt"}


def save_policy_without_room(c: dict) -> None:
    """`save_policy` whose model's safetensors write meets a full disk: safetensors' own error, not an OSError."""
    from safetensors import SafetensorError

    from infalign.trainer.pieces import save_policy

    class Policy:
        def save_pretrained(self, folder, **_):
            Path(folder).mkdir(parents=True)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    try:
        save_policy(Policy(), object(), c["file"])
    finally:
        assert not c["file"].with_name(".policy.tmp").exists(), "the half-written policy was left behind"


def no_space_left(tmp: Path, monkeypatch) -> dict:
    import infalign.runtime.atomic as atomic

    def create(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "_create_temp", create)  # the first thing a write does: create its temp file
    return {"file": tmp / "run" / "final_metrics.json"}


def read_only_mount(tmp: Path, monkeypatch, populated: bool = False) -> dict:
    """`tmp/cache` as on a read-only mount: creating anything under it fails with EROFS, as root too."""
    cache = tmp / "cache"
    cache.mkdir()
    if populated:  # a prebuilt cache, shared read-only
        (cache / "policy" / "0123").mkdir(parents=True)
    real_mkdir, real_open = os.mkdir, os.open

    def refuses(path) -> bool:
        return str(path).startswith(str(cache))

    def mkdir(path, *args, **kwargs):
        if refuses(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if refuses(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    return {"file": cache}


def read_only_bits(tmp: Path, monkeypatch) -> dict:
    cache = tmp / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    return {"file": cache}


def metrics_csv(tmp: Path, monkeypatch) -> dict:
    """A run's logs/metrics.csv, 2,000 rows of one metric."""
    logger = ResumableCSVLogger(save_dir=tmp / "run", name="logs", version="")
    for step in range(2000):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    logger.save()
    return {"file": tmp / "run" / "logs" / "metrics.csv", "logger": logger}


# ---------------------------------------------------------------------------------------------- stages
# Each takes the dict the case's `breaks` returned, plus "tmp" (the test's tmp_path).
def save_checkpoint(c: dict) -> None:
    import torch

    checkpoint_io.SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}}, c["file"])


def build_tokenizer(c: dict) -> None:
    get_or_build(c["file"], "tokenizer", {"vocab": 384}, lambda out: (out / "tokenizer.json").write_text("{}"))


def check_cache_root(c: dict) -> None:
    from infalign.runtime.artifacts import cache_root_warning  # (imported here: a missing fix fails its cases only)

    cache_root_warning(c["file"])


def add_a_column_without_room(c: dict) -> None:
    """A new metric (as at a run's first evaluation) makes the CSV logger rewrite metrics.csv with one more column,
    while the file cannot grow: RLIMIT_FSIZE at 1,000 bytes over its size makes every write past it fail with
    EFBIG (as a full disk fails with ENOSPC). The rows already written must survive."""
    import resource

    before = c["file"].read_bytes()
    c["logger"].log_metrics({"train/loss": 1.0, "eval/kl": 0.5}, step=2000)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 1000, limits[1]))
    try:
        c["logger"].save()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
        assert c["file"].read_bytes() == before, "rows of logs/metrics.csv were lost"


def append_rows_without_room(c: dict) -> None:
    """The CSV logger appends 99 rows to metrics.csv (no new column) while the file can grow by 100 bytes: the
    append fails part-way, leaving a half-written row. A resume trims the file to the checkpoint's rows
    (`truncate_csv`, here the 2,000 already there), which must give back exactly the rows written before."""
    import resource

    from infalign.runtime.atomic import read_csv_rows
    from infalign.trainer.checkpointing import truncate_csv

    before = read_csv_rows(c["file"])
    for step in range(2000, 2099):  # 99 rows: the 100th would flush them here (flush_logs_every_n_steps)
        c["logger"].log_metrics({"train/loss": 1.0}, step=step)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (c["file"].stat().st_size + 100, limits[1]))
    try:
        c["logger"].save()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
        assert len(read_csv_rows(c["file"])[1]) > 2000, "the append wrote nothing: the case tests no half row"
        truncate_csv(c["file"], 2000)
        assert read_csv_rows(c["file"]) == before, "a resume does not give back the rows written before"


def model_config(target: str, value: str) -> dict:
    return {"_target_": target, "name": "hf", "name_or_path": value}


def train_py(tmp: Path, *overrides: str) -> subprocess.Popen:
    """`python train.py` at smoke size on synthetic data, in `tmp/run`, with a private cache (every model is built)."""
    root = data_root(tmp, lambda raw: raw)["data_cfg"]["root"]
    return start(tmp / "cache", tmp / "run", f"data.root={root}", "data.subsets=[synth]", "data.source=local",
                 f"cache_root={tmp / 'cache'}", *overrides)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 300) -> None:
    """Read the run's stdout until a line holds `marker` (the stage has begun)."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break  # the run ended
            seen.append(line)
            if marker in line:
                return
    proc.kill()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen[-30:])}\n{proc.communicate()[1][-3000:]}")


def stop_during(sig: signal.Signals, marker: str, *overrides: str):
    """Start a run, send `sig` once `marker` shows its stage has begun, return what it printed."""

    def stage(c: dict) -> str:
        tmp = c["tmp"]
        proc = train_py(tmp, *overrides)
        wait_for_line(proc, marker)
        time.sleep(0.5)  # into the stage: each is sized below to last several seconds
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, err[-3000:]  # the shell's convention, as before: but with a message
        assert not list((tmp / "cache").glob("*/.tmp-*")), "a half-built cache entry was left behind"
        return err

    return stage


def final_evaluation_signalled(c: dict) -> None:
    """`LastCheckpoint` at the end of training, SIGTERM having arrived during the final evaluation (which runs in
    `WinRateCallback.on_train_end`, just before): it saves the final checkpoint, then must stop."""
    from types import SimpleNamespace

    from infalign.trainer.checkpointing import LastCheckpoint

    saved = []
    trainer = SimpleNamespace(current_epoch=3, save_checkpoint=lambda path, weights_only: saved.append(path),
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    callback = LastCheckpoint(c["tmp"] / "run", every=0)
    callback.stop_signal = signal.SIGTERM
    try:
        callback.on_train_end(trainer, None)
    finally:
        assert saved == [c["file"]], "the final checkpoint comes first"


# ------------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Case:
    id: str
    breaks: Callable[..., dict]  # (tmp_path, monkeypatch) -> {"file": the file or folder meant, ...}
    stage: Callable[[dict], object]  # what meets it (given breaks' dict and "tmp"): returns what it printed, or raises
    expect: str | None  # regex over the message; {file} stands for that path; None: no message needed
    as_root: bool = True  # False: permission bits, which root ignores


CASES = [
    Case("truncated data file", lambda t, m: data_root(t, truncated), lambda c: load_partitions(c["data_cfg"]),
         r"data file {file} cannot be read after line \d+: it is truncated.*data.source=hub"),
    Case("corrupted data file", lambda t, m: data_root(t, flipped), lambda c: load_partitions(c["data_cfg"]),
         r"data file {file} cannot be read at its start: its compressed data is corrupted.*Replace it"),
    Case("data file not UTF-8", lambda t, m: data_root(t, not_utf8), lambda c: load_partitions(c["data_cfg"]),
         r"data file {file} cannot be read at its start: it is not UTF-8 text"),
    Case("full disk writing a checkpoint", full_disk_for_checkpoints, save_checkpoint,
         r"cannot write checkpoint {file}: No space left on device \(ENOSPC\)\. Free space on the disk .*"
         r"resume=true"),
    Case("full disk writing the trained policy (safetensors)", lambda t, m: {"file": t / "run" / "policy"},
         save_policy_without_room, r"cannot write {file}: No space left on device \(ENOSPC\)\. Free space on the disk"),
    Case("full disk writing a result file", no_space_left, lambda c: atomic_write_json(c["file"], {"a": 1}),
         r"cannot write {file}: No space left on device \(ENOSPC\)\. Free space on the disk that holds"),
    Case("file size limit reached while logs/metrics.csv gains a column", metrics_csv, add_a_column_without_room,
         r"cannot write {file}: File too large \(EFBIG\)\. Free space on the disk that holds"),
    Case("full disk appending rows to logs/metrics.csv", metrics_csv, append_rows_without_room,
         r"cannot write {file}: File too large \(EFBIG\)\. Free space on the disk that holds .*resume=true"),
    Case("read-only cache directory (mount)", read_only_mount, check_cache_root,
         r"cannot write into the cache directory cache_root={file}: Read-only file system \(EROFS\)\. "
         r"Make {file} writable, or set cache_root=.*\$INFALIGN_CACHE"),
    Case("read-only cache directory (permissions)", read_only_bits, check_cache_root,
         r"cannot write into the cache directory cache_root={file}: Permission denied \(EACCES\)\. "
         r"Make {file} writable, or set cache_root=", as_root=False),
    Case("read-only prebuilt cache, an entry to build", lambda t, m: read_only_mount(t, m, populated=True),
         build_tokenizer,
         r"cannot write the tokenizer into the cache at {file}/tokenizer: Read-only file system \(EROFS\)\. "
         r"Make {file} writable, or set cache_root="),
    Case("missing local model folder", lambda t, m: {"file": t / "models" / "sft"},
         lambda c: check_loader_config(model_config("infalign.models.policy.hf_policy", str(c["file"])), "model"),
         r"^model\.name_or_path={file}: no such local folder \({file} does not exist.*\); a hub id looks like "
         r"org/name"),
    Case("missing local reward folder", lambda t, m: {"file": "./no/such/reward"},
         lambda c: check_loader_config(model_config("infalign.models.reward.hf_reward", c["file"]), "reward"),
         r"^reward\.name_or_path={file}: no such local folder"),
    Case("SIGINT while the reference policy trains",
         lambda t, m: {"file": t / "cache"},
         stop_during(signal.SIGINT, "cache miss: policy", "model.sft.epochs=60"),
         r"stopped by SIGINT while building the reference policy; nothing partial was kept.*\n"
         r"Run the same command again to continue:\n  python train\.py .*hydra\.run\.dir=\S+ resume=auto"),
    Case("SIGTERM during the calibration-cache build",
         lambda t, m: {"file": t / "cache"},
         stop_during(signal.SIGTERM, "cache miss: reference_samples", "calibration.m=1024",
                     "calibration.prompts_per_batch=1"),
         r"stopped by SIGTERM while building the calibration cache \(\d+/\d+ prompts\); nothing partial was kept.*\n"
         r"Run the same command again to continue:\n  python train\.py .*resume=auto"),
    Case("SIGTERM during the final evaluation", lambda t, m: {"file": t / "run" / "checkpoints" / "last.ckpt"},
         final_evaluation_signalled, r"^SIGTERM received: stopped after iteration 3, state saved to {file}$"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failure_names_the_file_and_the_cause(case, tmp_path, monkeypatch, capsys, caplog):
    if AS_ROOT and not case.as_root:
        pytest.skip("root ignores permission bits")
    ctx = {"tmp": tmp_path, **case.breaks(tmp_path, monkeypatch)}
    try:
        with caplog.at_level(logging.WARNING):
            printed = case.stage(ctx)
        message = (printed if isinstance(printed, str) else "") + capsys.readouterr().err + caplog.text
    except AssertionError:
        raise  # a stage's own check
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        message = str(e)
    finally:
        monkeypatch.undo()  # a patched os.open / os.mkdir must not outlive the stage
    if case.expect is not None:
        pattern = case.expect.format(**{k: re.escape(str(v)) for k, v in ctx.items() if k == "file"})
        assert re.search(pattern, message, re.MULTILINE | re.DOTALL), f"{case.id}: {message!r} !~ {pattern!r}"


def _file_size_limit(max_bytes: int) -> Callable[[], None]:
    """A child's RLIMIT_FSIZE: a write past it fails with EFBIG, as a full disk fails with ENOSPC."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ ends the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


@pytest.mark.parametrize("cache", ["fresh", "built", "build CLI"])
def test_a_run_that_cannot_write_ends_in_one_line(cache, tmp_path, session_cache, run_train):
    """A command on a disk that fills: one `error:` line naming the file, the cause and the way out, exit status 2,
    no traceback. "fresh": `python train.py` writing the reference policy's weights, written by safetensors, whose
    own error (SafetensorError, not an OSError) infalign.runtime.atomic.os_error reads the cause from; "built": its
    checkpoint; "build CLI": `python -m infalign.models.build` writing the policy's weights."""
    root = session_cache if cache == "built" else tmp_path / "cache"
    if cache == "built":
        run_train(*ARGS, f"hydra.run.dir={tmp_path / 'warm'}")  # every model in the cache first
    command = ["-m", "infalign.models.build", "scale=smoke", "stages=[policy]"] if cache == "build CLI" else \
        [str(REPO / "train.py"), *ARGS]
    env = {**os.environ, "INFALIGN_CACHE": str(root)}
    proc = subprocess.run([sys.executable, *command, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=_file_size_limit(64 * 1024))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    what = r"checkpoint \S+last\.ckpt" if cache == "built" else "the reference policy into the cache at"
    assert re.match(rf"error: cannot write {what}.*: File too large \(EFBIG\)\. Free space on the disk", last), last
    assert not list(root.glob("*/.tmp-*")), "a half-built cache entry was left behind"
