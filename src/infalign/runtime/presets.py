"""Presets whose record is what ran: final_metrics.json, the W&B run's name and the study tables name the chosen
`method` and `solver`, so `check_presets` refuses, in one line, a command line that contradicts them:
- a `transform=` or `calibrator=` other than the chosen `method=`'s (a method preset is that pair);
- an `rl.algo` or `rl.kl_penalty` (what makes one solver another; each solver's file sets them) other than the
  chosen solver's, naming the solver that has it; a `distill.*` key under a solver that does not distil.
The preset groups (`conf/method/`, `conf/solver/`, `conf/scale/`) set disjoint keys (tests/test_presets.py), so
none silently replaces another's value; a scale picks a solver, if it needs one, in its defaults list, and a
command-line `solver=` wins. Reads the preset files as plain YAML (omegaconf): it runs before torch is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from infalign.runtime.errors import ConfigError
from infalign.runtime.paths import conf_dir

__all__ = ["check_presets", "flatten", "preset_defaults", "preset_values"]

SOLVER_IDENTITY = ("rl.algo", "rl.kl_penalty")  # what makes one solver another: every solver file sets them


def _load(group: str, choice: str) -> dict:
    """The preset file as plain data; {} for one that is not in conf/ (a user's own, on `hydra.searchpath`)."""
    path = Path(conf_dir()) / group / f"{choice}.yaml"
    return (OmegaConf.to_container(OmegaConf.load(path)) or {}) if path.is_file() else {}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """`{dotted key: leaf}` of a nested mapping (an empty mapping is a leaf), each key after `prefix`."""
    if isinstance(node, Mapping) and node:
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def preset_values(group: str, choice: str) -> dict[str, Any]:
    """The keys `conf/<group>/<choice>.yaml` sets (dotted, values as written), with those of the files of its own
    group that its defaults list composes first (conf/solver/rloo_lora.yaml: rloo)."""
    raw = _load(group, choice)
    out = {}
    for entry in raw.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            out.update(preset_values(group, entry))
    return {**out, **flatten({k: v for k, v in raw.items() if k not in ("defaults", "hydra")})}


def preset_defaults(group: str, choice: str) -> dict[str, str]:
    """The groups `conf/<group>/<choice>.yaml` overrides in its defaults list: {"transform": "bon_exp", ...}."""
    return {str(k).removeprefix("override /"): v for entry in _load(group, choice).get("defaults") or []
            if isinstance(entry, Mapping) for k, v in entry.items() if str(k).startswith("override /")}


def check_presets(choices: Mapping, overrides: Sequence[str] = ()) -> None:
    """Refuse (ConfigError, one line) a command line that contradicts the chosen presets (see the module
    docstring). `choices`: Hydra's group choices; `overrides`: the command line's (`hydra.overrides.task`)."""
    given = {key.lstrip("+~"): value for key, _, value in (str(o).partition("=") for o in overrides)}
    method, solver = choices.get("method"), choices.get("solver")
    pair = preset_defaults("method", method) if method else {}
    for group, want in pair.items():
        if given.get(group, want) != want:
            raise ConfigError(f"method={method} is transform={pair.get('transform')} with calibrator="
                              f"{pair.get('calibrator')}, but the command line sets {group}={given[group]}: drop one "
                              "of them (a method preset, or transform= and calibrator= without it)")
    if not solver:
        return
    own = preset_values("solver", solver)
    for key in SOLVER_IDENTITY:
        if key in given and key in own and given[key] != str(own[key]):
            others = sorted((p.stem for p in (Path(conf_dir()) / "solver").glob("*.yaml")
                             if str(preset_values("solver", p.stem).get(key)) == given[key]),
                            key=lambda s: len(preset_values("solver", s).keys() ^ own.keys()))  # the nearest
            fix = f"choose solver={others[0]}" if others else f"leave {key} to the solver"
            raise ConfigError(f"{key}={given[key]} contradicts solver={solver} ({key}={own[key]}), which the run "
                              f"would record: {fix}")
    if not any(k.startswith("distill.") for k in own):
        for key in given:
            if key.startswith("distill."):
                raise ConfigError(f"{key}={given[key]} does nothing useful under solver={solver}, which does not "
                                  "distil: choose solver=distill (distillation only) or solver=distill_rl "
                                  "(distillation, then RL)")
