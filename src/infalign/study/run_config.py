"""A run's saved config read as data: the transform it trained with (`transform_from_run`) and other recorded
values (`calibration_m`, `yardstick_m`, `run_solver`, `config_value`).

A results folder may come from anyone, so its `.hydra/config.yaml` is never handed to Hydra's `instantiate`
(which imports and calls whatever `_target_` names: `builtins.open` with mode "w" truncates a file). It is loaded
with a safe YAML loader and read unresolved; only a `_target_` among the project's own transforms
(`ALLOWED_TRANSFORMS`, a table of already imported callables) is called, with only the parameters its constructor
accepts, each a plain scalar or a plain `${key}` reference followed by hand (never a resolver or a nested node).
`n`, `beta` and `t` come from final_metrics.json, where the run recorded what its config resolved to (so neither
a resolver nor the `t: auto` solver runs again).
"""
from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
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
from infalign.study.runs import RUN_CONFIG
from infalign.theory import factories

log = logging.getLogger(__name__)

__all__ = ["ALLOWED_TRANSFORMS", "RECORDED_ROOT_KEYS", "calibration_m", "config_value", "run_solver", "transform_config",
           "transform_from_run", "yardstick_m"]

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
    """The run's transform as it trained (None for raw rewards, and for a run whose solver used none: maxk records
    method=maxk), from its saved config and final metrics.

    `row`: the run's final_metrics.json; its recorded `n`, `beta` and `t` (the one `t: auto` resolved to in
    training) replace the config's, so neither a resolver nor a solver runs again. Raises ValueError naming
    the config file for anything that is not one of the project's transforms with plain parameters,
    FileNotFoundError without a config.
    """
    if row.get("transform") == "raw" or row.get("calibrator") == "passthrough" or row.get("method") == "maxk":
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
