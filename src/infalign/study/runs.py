"""Reading a sweep's runs as data: which runs finished, what each recorded, and the transform it trained with.

Everything the study (`infalign.study.analysis`), the sweep summary (`infalign.study.sweep`) and the bench
scripts know about a run comes through here, and only by reading files, never by executing them:

- `find_sweep_dir`: the sweep to read (a given directory, `$INFALIGN_SWEEP_DIR`, else the newest one);
- `finished_members`: every finished member the study can read, in sweep (job) order; a damaged one (its
  `final_metrics.json` no JSON object, its `eval_per_prompt.csv` with a value that is no finite number) is named
  with the file and the reason in one warning and left out, of the tables and of an archive alike;
- `collect_runs`: the `final_metrics.json` of each of those members;
- `logged_values`: one column of a member's `logs/metrics.csv`;
- `transform_from_run`: the member's transform rebuilt from its saved config and recorded values;
- `calibration_m`, `yardstick_m`, `run_solver`, `config_value`: other recorded values (the calibration's M, the M
  the run's target was calibrated with, the solver);
- `per_prompt_rows`: the member's eval_per_prompt.csv (paired comparisons between methods).

A results folder may come from anyone, so its `.hydra/config.yaml` is never handed to Hydra's
`instantiate` (which imports and calls whatever `_target_` names: `builtins.open` with mode "w" truncates a
file). Instead `transform_from_run`:

- loads the config with `OmegaConf.load` (a safe YAML loader) and reads it as plain containers, unresolved;
- accepts only a `_target_` among the project's own transforms (`ALLOWED_TRANSFORMS`: the classes of
  `infalign.core.transforms` and the builders of `infalign.theory.factories`), looked up in a table of already
  imported callables: the string is never imported or called;
- passes only the parameters the class's constructor accepts, each a plain number, string, bool or null;
  a value may be a plain reference to another key of the saved config (`n: ${n}`, followed by hand to a
  plain value), never a resolver call (`${oc.env:...}`, `${infalign.*:}`) or a nested node;
- takes `n` and `beta` (`RECORDED_ROOT_KEYS`) from final_metrics.json, where the run recorded the values
  its config resolved to (a study's `beta: ${infalign.pick:...}` needs no resolver), and the recorded `t`
  (the one `t: auto` resolved to in training), so no solver runs again.

Reading only: nothing here computes a result (the study does) or writes a file (study.report, study.sweep).
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from infalign.core.transforms import (
    BoNExpTransform,
    IdentityTransform,
    LogTransform,
    OptimalTransform,
    RawTransform,
    Transform,
    WoNExpTransform,
)
from infalign.runtime.paths import REPO_ROOT
from infalign.theory import factories

log = logging.getLogger(__name__)

__all__ = ["ALLOWED_TRANSFORMS", "FINAL_METRICS", "FINISHED", "METRICS_LOG", "PER_PROMPT", "RECORDED_ROOT_KEYS",
           "RUN_CONFIG", "SWEEP_DIR_ENV", "calibration_m", "collect_runs", "config_value", "final_metrics",
           "find_sweep_dir", "finished_members", "logged_values", "member_problem", "per_prompt_rows", "run_solver",
           "sweep_problem", "transform_config", "transform_from_run", "yardstick_m"]

ALLOWED_TRANSFORMS: dict[str, Callable[..., Transform]] = {
    **{f"infalign.core.transforms.{cls.__name__}": cls for cls in (RawTransform, IdentityTransform, LogTransform)},
    **{f"infalign.theory.factories.{build.__name__}": build
       for build in (factories.bon_exp, factories.won_exp, factories.optimal)},
    # runs configured before the factories named the classes, whose constructors took what the factories take now
    f"infalign.core.transforms.{BoNExpTransform.__name__}": factories.bon_exp,
    f"infalign.core.transforms.{WoNExpTransform.__name__}": factories.won_exp,
    f"infalign.core.transforms.{OptimalTransform.__name__}": factories.optimal,
}
RECORDED_ROOT_KEYS = ("n", "beta")  # top-level config values final_metrics.json records as resolved in training
_PLAIN = (int, float, str, bool, type(None))
# `${n}`, `${rl.target_kl}`: an absolute reference to another key, nothing else (no resolver, no relative key)
_REFERENCE = re.compile(r"^\$\{\s*([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\s*\}$")
_MAX_HOPS = 16
SWEEP_DIR_ENV = "INFALIGN_SWEEP_DIR"  # the sweep a notebook reads when it is given none
# the files of a member the study reads (infalign.study.archive keeps exactly these)
FINAL_METRICS = "final_metrics.json"   # written last: a member that has it finished
RUN_CONFIG = ".hydra/config.yaml"
METRICS_LOG = "logs/metrics.csv"
PER_PROMPT = "eval_per_prompt.csv"
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
    """The sweep directory to read, absolute: `sweep_dir` if given, else `$INFALIGN_SWEEP_DIR` (`SWEEP_DIR_ENV`) if
    set, else the directory under `root` (default `<repo>/outputs/multirun`) whose latest finished run is the
    newest. Any directory will do (a custom `hydra.sweep.dir` too): a relative path is taken from the repository
    root, or from the current directory when it exists only there; `~` is expanded.

    Raises FileNotFoundError, saying where the path came from, when it is not a directory or has no finished
    run (`<member>/final_metrics.json`), or when `root` holds no sweep with one."""
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


def member_problem(member_dir: Path) -> str | None:
    """Why a finished member cannot be used (one line naming the file and the reason), or None: the readers'
    own checks (`final_metrics`, `per_prompt_rows`), so a member is judged by exactly what the study would read."""
    try:
        final_metrics(member_dir)
        per_prompt_rows(member_dir)
    except ValueError as e:
        return str(e)
    return None


def finished_members(sweep_dir: Path) -> list[Path]:
    """The folders of the finished members (those with final_metrics.json; failed ones have none) that the study
    can read, in sweep (job) order: member 10 after member 9, not after member 1.

    A damaged member (`member_problem`) is left out with one warning naming the file and the reason, never read
    further: the study's tables would crash on it or, for a NaN in its per-prompt table, silently turn the
    paired comparison into n/a, and an archive would keep it as a result."""
    def job_order(path: Path):
        name = path.parent.name
        return (0, int(name), "") if name.isdigit() else (1, 0, name)

    members = []
    for path in sorted(Path(sweep_dir).glob(FINISHED), key=job_order):
        if problem := member_problem(path.parent):
            log.warning("skipped member %s: %s", path.parent.name, problem)
        else:
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


# ---------------------------------------------------------------------------------------------- transform
def _load(cfg_path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
    except Exception as e:  # unreadable YAML and the like: the same clear error as a refused config
        raise ValueError(f"{cfg_path}: not a readable run config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: a run config must be a mapping, got {type(cfg).__name__}")
    return cfg


def _plain_value(root: dict, value: Any, where: str, cfg_path: Path) -> Any:
    """`value` as a plain scalar, following plain `${key}` references through `root` by hand."""
    for _ in range(_MAX_HOPS):
        if not isinstance(value, _PLAIN):
            raise ValueError(f"{cfg_path}: `{where}` must be a plain number or string, got a "
                             f"{type(value).__name__} ({value!r}); a results folder is read as data only")
        if not isinstance(value, str) or "${" not in value:
            if value == "???":
                raise ValueError(f"{cfg_path}: `{where}` is missing (???)")
            return value
        match = _REFERENCE.match(value)
        if match is None:
            raise ValueError(f"{cfg_path}: `{where}` = {value!r} is not a plain `${{key}}` reference; resolver "
                             "calls and string interpolations are not evaluated when reading results")
        node: Any = root
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{cfg_path}: `{where}` = {value!r} refers to a key the config does not hold")
            node = node[part]
        where, value = match.group(1), node
    raise ValueError(f"{cfg_path}: `{where}`: more than {_MAX_HOPS} chained references (a cycle?)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def transform_config(cfg_path: Path, recorded: dict | None = None) -> tuple[Callable[..., Transform], dict[str, Any]]:
    """(allow-listed class or factory, its keyword arguments) of the `transform` node of a saved run config.

    `recorded`: the run's final_metrics.json; its numbers for `RECORDED_ROOT_KEYS` replace the config's top-level
    values (which `${n}`, `${beta}` refer to) and its `t` the transform's."""
    cfg_path = Path(cfg_path)
    recorded = recorded or {}
    root = _load(cfg_path)
    root.update({k: recorded[k] for k in RECORDED_ROOT_KEYS if _number(recorded.get(k))})
    node = root.get("transform")
    if not isinstance(node, dict):
        raise ValueError(f"{cfg_path}: no `transform` mapping in the run config")
    target = node.get("_target_")
    cls = ALLOWED_TRANSFORMS.get(target) if isinstance(target, str) else None
    if cls is None:
        raise ValueError(f"{cfg_path}: transform._target_ {target!r} is not one of the project's transforms "
                         f"({', '.join(ALLOWED_TRANSFORMS)}); it is not imported or called")
    accepted = [p.name for p in inspect.signature(cls).parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    ignored = sorted(k for k in node if k not in accepted and k != "_target_")
    if ignored:
        log.warning("%s: ignoring transform keys %s (not parameters of %s)", cfg_path, ignored, cls.__name__)
    params = {k: _plain_value(root, node[k], f"transform.{k}", cfg_path) for k in accepted if k in node and k != "t"}
    if "t" in accepted:
        t = recorded.get("t")
        if t is not None and not _number(t):
            raise ValueError(f"{cfg_path.parent.parent / 'final_metrics.json'}: recorded t must be a number, got {t!r}")
        if t is not None:
            params["t"] = float(t)  # the t the run trained with (t: auto was resolved then): no solver
        elif "t" in node:
            params["t"] = _plain_value(root, node["t"], "transform.t", cfg_path)
    return cls, params


def transform_from_run(row: dict, member_dir: Path) -> Transform | None:
    """The run's transform as it trained (None for raw rewards), from its saved config and final metrics.

    `row`: the run's final_metrics.json; its recorded `n`, `beta` and `t` (the one `t: auto` resolved to in
    training) replace the config's, so neither a resolver nor a solver runs again. Raises ValueError naming
    the config file for anything that is not one of the project's transforms with plain parameters,
    FileNotFoundError without a config.
    """
    if row.get("transform") == "raw" or row.get("calibrator") == "passthrough":
        return None
    cfg_path = Path(member_dir) / RUN_CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: the theory needs the run's transform config")
    cls, params = transform_config(cfg_path, row)
    return cls(**params)


# ---------------------------------------------------------------------------------------------- other recorded values
def config_value(member_dir: Path, dotted: str, default: Any = None) -> Any:
    """A plain value of the member's saved config (`.hydra/config.yaml`, e.g. `calibration.m`), read as data:
    a plain `${key}` reference is followed by hand, anything else that is not a plain scalar gives `default`
    (so does a missing config or key)."""
    cfg_path = Path(member_dir) / RUN_CONFIG
    if not cfg_path.exists():
        return default
    try:
        root = _load(cfg_path)
        node: Any = root
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return _plain_value(root, node, dotted, cfg_path)
    except ValueError:
        return default


def calibration_m(row: dict, member_dir: Path) -> int | None:
    """The M (reference samples per prompt) the run calibrated with: final_metrics.json's `calibration_m`, else
    the saved config's `calibration.m`; None if neither says (the theory then takes the continuous form)."""
    for value in (row.get("calibration_m"), config_value(member_dir, "calibration.m")):
        if _number(value) and float(value).is_integer() and value >= 1:
            return int(value)
    return None


def yardstick_m(row: dict, member_dir: Path, solver: str | None = None) -> int | None:
    """The M the run's target was calibrated with, at which its tilt yardstick is evaluated (issue 30, item 1):
    distillation (`solver` distill) calibrates each pool sample leave-one-out against the pool's other
    `distill.m` - 1 samples (final_metrics.json's `distill_m`, else the saved config's `distill.m`); the RL
    solvers calibrate against the `calibration.m` cached reference samples (`calibration_m`)."""
    solver = solver if solver is not None else run_solver(row, member_dir)
    if solver == "distill":
        for value in (row.get("distill_m"), config_value(member_dir, "distill.m")):
            if _number(value) and float(value).is_integer() and value >= 2:
                return int(value) - 1
    return calibration_m(row, member_dir)


def run_solver(row: dict, member_dir: Path) -> str:
    """The solver the run trained with: final_metrics.json's `solver`, else the saved config's `solver` preset,
    else its `rl.algo` (runs from before the solver block), else "rloo" (the default then)."""
    for value in (row.get("solver"), config_value(member_dir, "solver"), config_value(member_dir, "rl.algo")):
        if isinstance(value, str) and value:
            return value
    return "rloo"


def per_prompt_rows(member_dir: Path) -> dict[str, dict[str, float]]:
    """The member's eval_per_prompt.csv (final evaluation, one row per held-out prompt) as {prompt_id: {column:
    value}}; empty for runs written before it existed.

    ValueError naming the file, line and column for a value that is not a finite number (empty, NaN, text, a row
    cut short): the trainer writes every column for every prompt, so such a table is damaged, and a NaN would
    make every paired comparison with the member n/a."""
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
