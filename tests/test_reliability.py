"""Unit level: atomic writes, checkpoint checksums and safe loading, resume decisions, metric files on resume,
guarded loggers, the cache under kills and planted pickles."""

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from infalign.runtime import atomic
from infalign.runtime.artifacts import get_or_build, remove_dead_builds
from infalign.runtime.atomic import atomic_write, atomic_write_csv, read_csv_rows
from infalign.runtime.checkpoint_io import CheckpointError, SafeCheckpointIO, checksum_path, load_checkpoint, verify_checkpoint
from infalign.runtime.loggers import GuardedLogger, ResumableCSVLogger, build_loggers
from infalign.runtime.manifest import entry_path
from infalign.trainer.checkpointing import truncate_csv
from infalign.trainer.resume import check_resume, config_changes, resolve_resume, resume_command

REPO = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil(marker)}, f)


# ------------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "metrics.csv"
    atomic_write_csv(target, [{"a": 1, "b": 2}])

    def dies(f):
        f.write(b"half a fi")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert read_csv_rows(target) == (["a", "b"], [{"a": "1", "b": "2"}])
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temp file left


UMASKS = [0o022, 0o077, 0o002]  # each test below runs one Python process that sets each of them in turn


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_writes_get_the_mode_a_plain_open_gives_and_leave_the_umask_alone(tmp_path):
    """0o666 less the umask, as `open(path, "w")` would create it (not mkstemp's owner-only 0600), and importing
    or using the module never sets the process umask, even for a moment (other threads' files would get it)."""
    script = textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        os.umask({UMASKS[0]:#o})
        calls = []
        real_umask = os.umask
        os.umask = lambda mask: calls.append(mask) or real_umask(mask)
        from infalign.runtime.atomic import atomic_write_csv, atomic_write_figure, atomic_write_text
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        results = {{}}
        for umask in {UMASKS!r}:
            real_umask(umask)  # the test's own change, not recorded in `calls`
            out = Path(sys.argv[1]) / oct(umask)
            out.mkdir()
            atomic_write_text(out / "a.txt", "x")
            atomic_write_csv(out / "b.csv", [{{"a": 1}}])
            atomic_write_figure(out / "c.png", plt.figure(figsize=(1, 1)), dpi=20)
            with open(out / "plain.txt", "w") as f:
                f.write("x")
            modes = {{p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}}
            current = real_umask(umask)
            results[umask] = {{"modes": modes, "umask": current}}
        print(json.dumps({{"results": results, "umask_calls": calls}}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["umask_calls"] == []
    assert sorted(int(u) for u in result["results"]) == sorted(UMASKS)
    for umask in UMASKS:
        got = result["results"][str(umask)]
        assert got["modes"] == {name: 0o666 & ~umask for name in ("a.txt", "b.csv", "c.png", "plain.txt")}, oct(umask)
        assert got["umask"] == umask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_policy_and_cache_entries_get_the_umask_modes(tmp_path):
    """policy/ (model.safetensors included: safetensors alone writes it 0600) and a cache entry built with
    safetensors' save_file get 0o666 / 0o777 less the umask, every file and directory, and the umask is never set;
    under umask 0o022 and 0o007 in turn."""
    umasks = [0o022, 0o007]
    script = textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        os.umask({umasks[0]:#o})
        calls = []
        real_umask = os.umask
        os.umask = lambda mask: calls.append(mask) or real_umask(mask)
        import torch
        from safetensors.torch import save_file
        from tokenizers import Tokenizer, models
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
        from infalign.runtime.artifacts import get_or_build
        from infalign.trainer.pieces import save_policy as _save_policy
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({{"a": 0, "<eos>": 1}}, unk_token="a")),
                                      eos_token="<eos>", pad_token="<eos>")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=2, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=1,
                                           eos_token_id=1))
        results = {{}}
        for umask in {umasks!r}:
            real_umask(umask)  # the test's own change, not recorded in `calls`
            out = Path(sys.argv[1]) / oct(umask)
            out.mkdir()
            for _ in range(2):  # a new policy/, then one saved over it
                _save_policy(model, tok, out / "run" / "policy")
            get_or_build(out / "cache", "reference_samples", {{"k": 1}},
                         lambda d: save_file({{"rewards": torch.zeros(2)}}, str(d / "rewards.safetensors")))
            modes = {{str(p.relative_to(out)): [p.is_dir(), p.stat().st_mode & 0o7777] for p in sorted(out.rglob("*"))}}
            results[umask] = {{"modes": modes, "umask": real_umask(umask)}}
        print(json.dumps({{"results": results, "umask_calls": calls}}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["umask_calls"] == []
    assert sorted(int(u) for u in result["results"]) == sorted(umasks)
    for umask in umasks:
        got = result["results"][str(umask)]
        modes = got["modes"]
        assert "run/policy/model.safetensors" in modes and any(p.endswith("rewards.safetensors") for p in modes)
        assert not any(".tmp" in p or "probe" in p for p in modes)  # no temp build, no probe left behind
        assert {p: m for p, (_, m) in modes.items()} == \
            {p: (0o777 if d else 0o666) & ~umask for p, (d, _) in modes.items()}, oct(umask)
        assert got["umask"] == umask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_give_plain_modes_widens_owner_only_files_only(tmp_path):
    """Owner-only files and directories get the plain mode (read off a probe: here 0o644 / 0o755, under umask
    0o022 set for the test), anything a writer gave group or other bits keeps them, an executable stays one."""
    old_umask = os.umask(0o022)
    try:
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True, mode=0o700)
        tree.chmod(0o700)
        for name, mode in (("owner.bin", 0o600), ("sub/deep.bin", 0o600), ("shared.txt", 0o640), ("run.sh", 0o700)):
            (tree / name).write_text("x")
            (tree / name).chmod(mode)
        assert atomic.plain_mode(tree) == 0o644 and atomic.plain_mode(tree, is_dir=True) == 0o755
        changed = atomic.give_plain_modes(tree)
    finally:
        os.umask(old_umask)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [tree, *tree.rglob("*")]}
    assert modes == {"tree": 0o755, "tree/sub": 0o755, "tree/owner.bin": 0o644, "tree/sub/deep.bin": 0o644,
                     "tree/shared.txt": 0o640, "tree/run.sh": 0o755}
    assert len(changed) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["tree"]  # no probe left


def test_atomic_figure_is_the_same_png_savefig_writes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "direct.png", dpi=50)
    atomic.atomic_write_figure(tmp_path / "atomic.png", fig, dpi=50)
    plt.close(fig)
    assert (tmp_path / "atomic.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.png", "direct.png"]  # no temp file left


def test_truncate_csv_keeps_the_header_and_first_rows(tmp_path):
    path = tmp_path / "eval_metrics.csv"
    atomic_write_csv(path, [{"iteration": i, "x": i * 0.5} for i in range(1, 6)])
    assert truncate_csv(path, 2) == 3
    assert read_csv_rows(path) == (["iteration", "x"], [{"iteration": "1", "x": "0.5"}, {"iteration": "2", "x": "1.0"}])
    assert truncate_csv(path, 9) == 0


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved(tmp_path):
    ckpt = {"state_dict": {"w": torch.arange(4000, dtype=torch.float32)}, "epoch": 2, "loops": {"x": (1, 2)}}
    path = tmp_path / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(ckpt, path)
    return path, ckpt


def test_checkpoint_round_trip_with_checksum(saved):
    path, ckpt = saved
    assert checksum_path(path).is_file() and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt",
                                                                                               "last.ckpt.sha256"]
    loaded = SafeCheckpointIO().load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"]) and loaded["loops"] == {"x": (1, 2)}


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_without_checksum"])
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_way_out(saved, damage):
    path, _ = saved
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # inside the tensor bytes: torch.load alone would not notice
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    if damage == "truncate_without_checksum":
        checksum_path(path).unlink()  # an older checkpoint: the load check still catches it
    with pytest.raises(CheckpointError, match="last.ckpt") as err:
        load_checkpoint(path)
    assert "overwrite=true" in str(err.value)


def test_crash_between_checksum_and_rename_leaves_a_checkpoint_that_verifies(saved, monkeypatch):
    path, _ = saved
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst) == path:
            raise OSError("power cut (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        SafeCheckpointIO().save_checkpoint({"epoch": 3}, path)
    monkeypatch.undo()
    assert len(json.loads(checksum_path(path).read_text())["sha256"]) == 2  # new digest + the one in place
    verify_checkpoint(path)
    assert load_checkpoint(path)["epoch"] == 2  # the previous, whole checkpoint


def test_malicious_checkpoint_is_never_unpickled(tmp_path):
    marker, path = tmp_path / "PWNED", tmp_path / "run" / "checkpoints" / "last.ckpt"
    plant_pickle(path, marker)
    with pytest.raises(CheckpointError, match="weights_only"):
        SafeCheckpointIO().load_checkpoint(path)
    with pytest.raises(CheckpointError):
        resolve_resume(tmp_path / "run", "auto", False)  # resume refuses it before any model is built
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- cache
def test_pickle_planted_in_a_cache_entry_is_discarded_unread(tmp_path):
    marker, calls = tmp_path / "PWNED", []

    def build(out: Path):
        calls.append(1)
        (out / "model.safetensors").write_bytes(b"weights")

    entry = get_or_build(tmp_path / "cache", "policy", {"k": 1}, build)
    plant_pickle(entry.path / "pytorch_model.bin", marker)  # what transformers would fall back to
    again = get_or_build(tmp_path / "cache", "policy", {"k": 1}, build)
    assert not again.hit and len(calls) == 2  # unlisted file: entry refused and rebuilt
    assert not (again.path / "pytorch_model.bin").exists() and not marker.exists()


def test_transformers_folder_with_a_pickle_only_is_refused(tmp_path):
    from transformers import GPT2Config

    from infalign.models.policy import hf_policy
    from infalign.models.tokenizer import train_bpe_tokenizer

    marker = tmp_path / "PWNED"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=300, n_positions=16).save_pretrained(tmp_path)
    train_bpe_tokenizer(["hello world"] * 4, vocab_size=300).save_pretrained(tmp_path)
    plant_pickle(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="(?i)weights.only"):  # transformers loads .bin with weights_only=True
        hf_policy(name_or_path=str(tmp_path))
    assert not marker.exists()


def test_killed_cache_build_leaves_no_entry_and_its_leftovers_are_cleaned(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from infalign.runtime.artifacts import get_or_build
        def build(out):
            (out / "half.bin").write_bytes(b"x" * 1000)
            print("building", flush=True)
            time.sleep(60)
        get_or_build({str(tmp_path)!r}, "policy", {{"k": 1}}, build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kind_dir = tmp_path / "policy"
    assert not entry_path(tmp_path, "policy", {"k": 1}).exists()  # no half-entry under the final name
    assert [p.name.startswith(".tmp-") for p in kind_dir.iterdir()] == [True]
    assert len(remove_dead_builds(kind_dir)) == 1 and list(kind_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------- resume decisions
def make_run(run_dir: Path, checkpoint: bool = True) -> Path:
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "metrics.csv").write_text("step\n0\n")
    (run_dir / "eval_metrics.csv").write_text("iteration\n2\n")
    if checkpoint:
        SafeCheckpointIO().save_checkpoint({"epoch": 1}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


def test_resume_modes(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "checkpoints" / ".last.ckpt.abc123.tmp").write_bytes(b"half")  # what a kill mid-save leaves
    assert resolve_resume(run, True, False) == run / "checkpoints" / "last.ckpt"
    assert resolve_resume(run, "auto", False) == run / "checkpoints" / "last.ckpt"
    assert not (run / "checkpoints" / ".last.ckpt.abc123.tmp").exists()
    with pytest.raises(FileExistsError, match="resume=true.*overwrite=true"):
        resolve_resume(run, False, False)  # never clobbers a run silently
    assert resolve_resume(run, False, True) is None and not (run / "checkpoints").exists()
    assert not (run / "eval_metrics.csv").exists()  # overwrite: no stale rows for the new run to append to
    with pytest.raises(FileNotFoundError, match="resume=auto"):
        resolve_resume(tmp_path / "empty", True, False)
    early = make_run(tmp_path / "early", checkpoint=False)  # killed before its first checkpoint
    assert resolve_resume(early, "auto", False) is None and not (early / "eval_metrics.csv").exists()


def test_only_the_first_process_judges_the_run_dir(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP process Lightning started after rank 0 began writing here
    assert resolve_resume(run, False, False) is None  # neither refused nor cleared
    assert resolve_resume(run, "auto", False) == run / "checkpoints" / "last.ckpt"
    assert (run / "eval_metrics.csv").exists()


def test_resume_command_replaces_the_run_options():
    cmd = resume_command(["n=4", "resume=auto", "hydra.run.dir=/old", "overwrite=false", "data.root=/a b"], Path("/r"))
    assert cmd == "python train.py n=4 'data.root=/a b' hydra.run.dir=/r resume=true"
    assert resume_command(["beta=0.5", "resume_allow_changes=true"], Path("/r")) == \
           "python train.py beta=0.5 hydra.run.dir=/r resume=true"  # the checkpoint has the new config by then


def record(**config):
    base = {"n": 4, "beta": 0.05, "seed": 0, "rl": {"iterations": 30}, "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
            "data": {"root": "/a", "limit": 160},
            "eval": {"k": 16}, "trainer": {"max_epochs": 30}, "progress": True}
    for key, value in config.items():
        node, *path = key.split("__")
        target = base
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return {"config": base, "choices": {"transform": "bon_exp", "model": "tiny"}}


def test_config_changes_cover_the_experiment_only():
    assert config_changes(record(), record()) == ({}, {})
    # eval, trainer, progress: not the experiment; data.root: where the data is, not what
    assert config_changes(record(), record(eval__k=8, trainer__max_epochs=40, progress=False, data__root="/b")) == ({}, {})
    assert config_changes(record(), record(rl__iterations=40)) == ({}, {"rl.iterations": (30, 40)})  # an extension
    assert config_changes(record(), record(rl__iterations=20)) == ({"rl.iterations": (30, 20)}, {})
    changed = record(beta=0.5, data__limit=None, seed=True)  # true is not 0 == False, None not 160
    changed["choices"]["transform"] = "won_exp"
    del changed["config"]["optimizer"]["lr"]
    assert config_changes(record(), changed)[0] == {"beta": (0.05, 0.5), "choices.transform": ("bon_exp", "won_exp"),
                                                    "data.limit": (160, None), "optimizer.lr": (0.001, "<absent>"),
                                                    "seed": (0, True)}
    assert config_changes(record(beta=1), record(beta=1.0)) == ({}, {})


def test_a_checkpoint_without_a_config_is_resumed_with_a_warning(tmp_path, caplog):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"epoch": 1, "global_step": 4}, ckpt)  # as written before configs were kept
    with caplog.at_level(logging.WARNING, logger="infalign.trainer.resume"):
        plan = check_resume(tmp_path / "run", ckpt, record(), allow_changes=False, iterations=30, n=4)
    assert "records no config" in caplog.text
    assert plan.finished is None and plan.entry["config_checked"] is False and plan.entry["from_iteration"] == 2


# ------------------------------------------------------------------------------------------- loggers
def test_csv_logger_keeps_earlier_rows_on_resume_and_adds_columns_atomically(tmp_path):
    first = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="")
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    again = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="", keep_existing=True)
    again.log_metrics({"a": 2.0, "b": 3.0}, step=1)  # a new column: the file is rewritten with a new header
    again.save()
    header, rows = read_csv_rows(tmp_path / "logs" / "metrics.csv")
    assert header == ["a", "b", "step"] and [r["a"] for r in rows] == ["1.0", "2.0"]
    fresh = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="")  # Lightning's behaviour otherwise
    fresh.log_metrics({"a": 9.0}, step=0)
    fresh.save()
    assert len(read_csv_rows(tmp_path / "logs" / "metrics.csv")[1]) == 1


def test_guarded_logger_reports_once_and_carries_on(caplog):
    from fake_loggers import FailingLogger

    lg = GuardedLogger(FailingLogger(fail_after=1))
    with caplog.at_level(logging.WARNING, logger="infalign.runtime.loggers"):
        for step in range(5):
            lg.log_metrics({"x": 1.0}, step=step)  # the second call fails, the rest are skipped
        lg.save()
        lg.finalize("success")
    assert caplog.text.count("failed in log_metrics") == 1 and "switched off" in caplog.text
    assert isinstance(lg.error, ConnectionError)


@pytest.mark.parametrize("fault", ["not_installed", "not_logged_in"])
def test_wandb_that_cannot_start_never_stops_the_run(tmp_path, monkeypatch, caplog, fault):
    import wandb

    if fault == "not_installed":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    else:
        def init(*args, **kwargs):
            raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

        monkeypatch.setattr(wandb, "init", init)
    cfg = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "infalign",
                            "mode": "online", "save_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="infalign.runtime.loggers"):
        loggers = build_loggers(cfg, tmp_path)
        for lg in loggers:
            lg.log_hyperparams({"n": 4})
            lg.log_metrics({"x": 1.0}, step=0)
            lg.save()
    assert caplog.text.count("WandbLogger") == 1, caplog.text  # one warning, naming the logger
    assert (tmp_path / "logs" / "metrics.csv").is_file()  # the local log is unaffected
