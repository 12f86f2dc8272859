"""Reading a sweep's runs as data, never executing them: which members finished and can be read
(`finished_members`: a damaged one is named in one warning and left out, of the tables and of an archive alike),
their final metrics, logged values and per-prompt tables. The saved config is read by `infalign.study.run_config`.
Nothing here computes a result or writes a file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

from infalign.runtime.paths import REPO_ROOT

log = logging.getLogger(__name__)

__all__ = ["FINAL_METRICS", "FINISHED", "METRICS_LOG", "PER_PROMPT", "RUN_CONFIG", "SWEEP_DIR_ENV", "collect_runs",
           "final_metrics", "find_sweep_dir", "finished_members", "logged_values", "per_prompt_rows",
           "sweep_problem"]

SWEEP_DIR_ENV = "INFALIGN_SWEEP_DIR"  # the sweep a notebook reads when it is given none
# the files of a member the study reads (infalign.study.archive keeps exactly these)
FINAL_METRICS = "final_metrics.json"   # written last: a member that has it finished
RUN_CONFIG = ".hydra/config.yaml"
METRICS_LOG = "logs/metrics.csv"
PER_PROMPT = "eval_per_prompt.csv"
TILT_FIT = "tilt_fit.json"  # python -m infalign.study.tilt_fit <member>, where it was run
FINISHED = f"*/{FINAL_METRICS}"


# ---------------------------------------------------------------------------------------------- runs
def _newest_sweep(root: Path) -> Path | None:
    """The directory under `root` whose latest finished run is the most recent (None if none has one)."""
    if not root.is_dir():
        return None
    newest: tuple[float, Path] | None = None
    for sweep in root.iterdir():
        stamps = [f.stat().st_mtime for f in sweep.glob(FINISHED)] if sweep.is_dir() else []
        if stamps and (newest is None or max(stamps) > newest[0]):
            newest = (max(stamps), sweep)
    return newest[1] if newest else None


def find_sweep_dir(sweep_dir: str | Path | None = None, root: str | Path | None = None,
                   environ: Mapping[str, str] | None = None) -> Path:
    """The sweep directory to read, absolute: `sweep_dir` if given, else `$INFALIGN_SWEEP_DIR` if set, else the
    directory under `root` (default `<repo>/outputs/multirun`) whose latest finished run is the newest. A relative
    path is taken from the repository root, or from the current directory when it exists only there. Raises
    FileNotFoundError, saying where the path came from, when it is no sweep with a finished run."""
    environ = os.environ if environ is None else environ
    if sweep_dir is not None and str(sweep_dir).strip():
        given, source = sweep_dir, "sweep_dir"
    elif environ.get(SWEEP_DIR_ENV, "").strip():
        given, source = environ[SWEEP_DIR_ENV].strip(), f"${SWEEP_DIR_ENV}"
    else:
        root = Path(root) if root is not None else REPO_ROOT / "outputs" / "multirun"
        newest = _newest_sweep(root)
        if newest is None:
            raise FileNotFoundError(f"no sweep with a finished run (<member>/final_metrics.json) under {root}: run "
                                    f"`python train.py -m study=smoke` first, or name the sweep (sweep_dir = ..., or "
                                    f"{SWEEP_DIR_ENV}=<dir>)")
        return newest.resolve()
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = next((base / path for base in (REPO_ROOT, Path.cwd()) if (base / path).is_dir()), REPO_ROOT / path)
    if not path.is_dir():
        raise FileNotFoundError(f"{source}: {path} is not a directory (a relative path is taken from the repository "
                                f"root {REPO_ROOT}, or from the current directory {Path.cwd()})")
    if problem := sweep_problem(path):
        raise FileNotFoundError(f"{source}: {problem}")
    return path.resolve()


def sweep_problem(path: Path) -> str | None:
    """Why `path` is no sweep directory with a finished member (one line naming it), or None. Only looks for the
    members' final_metrics.json: whether they can be read is `finished_members`' check."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory (expected a sweep directory, e.g. outputs/multirun/<time>)"
    if any(path.glob(FINISHED)):
        return None
    hint = (" it is one run's directory: give the sweep it belongs to, its parent" if (path / FINAL_METRICS).exists()
            else " a sweep directory is the hydra.sweep.dir of `python train.py -m ...`, one folder per member")
    return f"{path} has no finished run (no <member>/final_metrics.json);{hint}"


def final_metrics(member_dir: Path) -> dict:
    """The member's final_metrics.json; ValueError naming the file if it is not a readable JSON object (a copy
    cut short, a disk that filled up)."""
    path = Path(member_dir) / FINAL_METRICS
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: expected a JSON object of the run's final metrics, got {type(row).__name__}")
    return row


def finished_members(sweep_dir: Path) -> list[Path]:
    """The folders of the finished members (those with final_metrics.json) that the study can read, in sweep (job)
    order: member 10 after member 9, not after member 1.

    A damaged member is left out with one warning naming the file and the reason (the readers' own checks, so a
    member is judged by exactly what the study reads): the tables would crash on it or, for a NaN in its
    per-prompt table, silently turn the paired comparison into n/a, and an archive would keep it as a result."""
    def job_order(path: Path):
        name = path.parent.name
        return (0, int(name), "") if name.isdigit() else (1, 0, name)

    members = []
    for path in sorted(Path(sweep_dir).glob(FINISHED), key=job_order):
        try:
            final_metrics(path.parent)
            per_prompt_rows(path.parent)
        except ValueError as e:
            log.warning("skipped member %s: %s", path.parent.name, e)
            continue
        members.append(path.parent)
    return members


def collect_runs(sweep_dir: Path) -> list[dict]:
    """final_metrics.json of every finished member the study can read (`finished_members`), in sweep (job)
    order, each with its folder's name as `member`."""
    return [{**final_metrics(member), "member": member.name} for member in finished_members(sweep_dir)]


def logged_values(member_dir: Path, column: str) -> list[float]:
    """Every logged value of `column` in the run's logs/metrics.csv, in order (empty if absent)."""
    path = Path(member_dir) / METRICS_LOG
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


def per_prompt_rows(member_dir: Path) -> dict[str, dict[str, float]]:
    """The member's eval_per_prompt.csv (one row per held-out prompt) as {prompt_id: {column: value}}; empty for
    runs written before it existed. ValueError naming the file, line and column for a value that is no finite
    number: the trainer writes every column for every prompt, so such a table is damaged."""
    path = Path(member_dir) / PER_PROMPT
    if not path.exists():
        return {}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if "prompt_id" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no prompt_id column (header {reader.fieldnames})")
            rows = {}
            for r in reader:
                rows[r["prompt_id"]] = {k: _finite(v, f"{path}: line {reader.line_num}, column {k}")
                                        for k, v in r.items() if k != "prompt_id"}
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV table ({type(e).__name__}: {e})") from None


def _finite(value: str | None, where: str) -> float:
    try:
        x = float(value)  # TypeError: None, a row shorter than the header
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return x
