"""One command per run directory (real processes, real locks), and a refused command changes no file there."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
# one iteration, no evaluation but the final one: each first command needs only to run, hold its directory, finish
SHORT = ["scale=smoke", "logger=none", "progress=false", "num_threads=1", "rl.iterations=1", "eval.every=0"]


def files_of(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones, .hydra and train.log included) -> a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def train(session_cache, *overrides) -> subprocess.Popen:
    env = {**os.environ, "INFALIGN_CACHE": str(session_cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def waiting(until: Path) -> list[str]:
    """A logger that holds the run at its first metrics until `until` exists (tests/fake_loggers.py)."""
    return ["+logger._target_=tests.fake_loggers.WaitingLogger", f"+logger.until={until}"]


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the first command ended before {path} appeared:\n{finish(proc)[1][-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_second_run_in_a_running_runs_directory_is_refused_and_changes_nothing(session_cache, tmp_path):
    run_dir, go_on = tmp_path / "run", tmp_path / "go_on"
    first = train(session_cache, *SHORT, *waiting(go_on), f"hydra.run.dir={run_dir}")
    # written once the first command runs there (config.yaml, hydra.yaml, then overrides.yaml: the record whole)
    wait_for(run_dir / ".hydra" / "overrides.yaml", first)
    before = files_of(run_dir)
    # the three second commands side by side (each is refused on its own: the first command holds the directory)
    seconds = [train(session_cache, *SHORT, *extra, f"hydra.run.dir={run_dir}")
               for extra in (["overwrite=true", "beta=0.2"], ["resume=auto"], ["beta=0.2"])]
    for second in seconds:
        rc, out = finish(second)
        assert rc == 2, out[-3000:]
        assert out.strip().splitlines()[-1].startswith("error: ") and "is in use by another command" in out, out
        after = files_of(run_dir)  # the first run goes on writing its own files; its record stays its own
        assert {k: after[k] for k in before if k.startswith(".hydra/")} == \
            {k: v for k, v in before.items() if k.startswith(".hydra/")}
    go_on.touch()
    rc, out = finish(first)
    assert rc == 0, out[-3000:]
    assert json.loads((run_dir / "final_metrics.json").read_text())["beta"] == 0.1  # its own beta, to the end
    assert "beta: 0.1" in (run_dir / "logs" / "hparams.yaml").read_text()


@pytest.fixture(scope="module")
def held_sweep(session_cache, tmp_path_factory):
    """A sweep (seed=1,2) held at its first member's first metrics while a second sweep into its directory runs,
    then let go: what the test below checks, and a finished sweep for the tests after it (`finished_sweep`)."""
    root = tmp_path_factory.mktemp("held")
    sweep, go_on = root / "sweep", root / "go_on"
    first = train(session_cache, "-m", *SHORT, *waiting(go_on), "seed=1,2", f"hydra.sweep.dir={sweep}")
    wait_for(sweep / "0" / ".hydra" / "config.yaml", first)
    multirun = (sweep / "multirun.yaml").read_bytes()
    member = files_of(sweep / "0")
    second = finish(train(session_cache, "-m", *SHORT, "beta=0.2", "seed=1,2", f"hydra.sweep.dir={sweep}"))
    after = {"multirun.yaml": (sweep / "multirun.yaml").read_bytes(), "member": files_of(sweep / "0")}
    go_on.touch()
    return SimpleNamespace(sweep=sweep, multirun=multirun, member=member, second=second, after=after,
                           first=finish(first))


def test_a_second_sweep_into_a_running_sweeps_directory_is_refused_before_it_writes(held_sweep):
    rc, out = held_sweep.second
    assert rc == 2 and "is in use by another command" in out, out[-3000:]
    assert held_sweep.after["multirun.yaml"] == held_sweep.multirun
    assert held_sweep.after["member"][".hydra/config.yaml"] == held_sweep.member[".hydra/config.yaml"]
    rc, out = held_sweep.first
    assert rc == 0, out[-3000:]
    for m in ("0", "1"):
        assert "beta: 0.1" in (held_sweep.sweep / m / ".hydra" / "config.yaml").read_text()


@pytest.fixture(scope="module")
def finished_sweep(held_sweep):
    """The sweep above, finished: members 0 (seed=1) and 1 (seed=2), run with SHORT (and a logger that waited,
    which is no part of the experiment)."""
    rc, out = held_sweep.first
    assert rc == 0, out[-3000:]
    return held_sweep.sweep


IDLE = [  # (extra overrides, exit status, what the output says)
    ([], 2, "already holds a run's outputs"),  # no resume flag
    (["beta=-1"], 2, "error: beta must be a positive"),  # a bad value
    (["resume=true", "beta=0.2"], 2, "error: resume refused"),  # a changed experiment
    (["resume=auto"], 0, "is already finished"),  # nothing to do
    (["resume=true"], 0, "is already finished"),
]


@pytest.fixture(scope="module")
def idle_commands(session_cache, finished_sweep, tmp_path_factory):
    """Each IDLE command in its own copy of the finished member (one command per directory), side by side:
    case -> (the copy, its files before, exit status, output)."""
    root = tmp_path_factory.mktemp("idle")
    started = []
    for i, (extra, _, _) in enumerate(IDLE):
        member = root / str(i)
        shutil.copytree(finished_sweep / "0", member)
        before = files_of(member)
        started.append((member, before, train(session_cache, *SHORT, "seed=1", *extra, f"hydra.run.dir={member}")))
    return [(member, before, *finish(proc)) for member, before, proc in started]


@pytest.mark.parametrize("case", range(len(IDLE)), ids=[says for _, _, says in IDLE])
def test_a_refused_or_idle_command_changes_no_file_in_the_run(idle_commands, case):
    _, rc, says = IDLE[case]
    member, before, got, out = idle_commands[case]
    assert got == rc and says in out, out[-3000:]
    assert "Traceback" not in out  # a refusal is one line (exit status 2)
    assert files_of(member) == before  # .hydra/*, train.log and every result, byte for byte


def test_archive_resume_archive_again(session_cache, finished_sweep, tmp_path, capsys):
    """The README's study workflow: archive, `-m ... resume=auto` the sweep (its members are finished), archive
    again: the members are unchanged, so the second archive finds nothing new (it raised ArchiveConflictError).
    The archive command `python -m infalign.study SWEEP --archive DIR` is its `main` here, in this process."""
    from infalign.study.__main__ import main

    archive = tmp_path / "archive"
    argv = [str(finished_sweep), "--archive", str(archive)]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    rc, out = finish(train(session_cache, "-m", *SHORT, "seed=1,2", "resume=auto", f"hydra.sweep.dir={finished_sweep}"))
    assert rc == 0 and "is already finished" in out, out[-3000:]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
