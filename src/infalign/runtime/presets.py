"""Presets that compose or refuse: no preset silently replaces another's value, and the record is what ran.

The preset groups (`conf/method/`, `conf/solver/`, `conf/scale/`) are `@package _global_` patches: when two
of them set the same key, whichever comes later in `conf/train.yaml`'s defaults list wins and nothing says so
(`method=bon_exp solver=distill scale=smollm2` trained with the scale's learning rate and the solver's pool).
`check_presets` refuses such a composition in one line naming both files and the key, unless the command line
sets the key itself (then the user chose). A study (`conf/study/`) is a sweep that names its own presets and
sets what it varies on purpose: its values stand above the three groups' and are not compared.

It also keeps the recorded choices true (final_metrics.json, the W&B run's name, the study tables group by them):
- a `transform=` or `calibrator=` on the command line that contradicts the chosen `method=` is refused (the
  method preset is that pair; the run would train the one and record the other);
- a solver is chosen by `solver=`: a command-line value of a key that makes one solver another (`rl.algo`,
  `rl.kl_penalty`; each solver's file sets them) that differs from the chosen solver's is refused, naming the
  solver that has it; so is a `distill.*` key under a solver whose file sets no `distill` block.

Reads the preset files as plain YAML (stdlib, omegaconf): it runs before torch is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from infalign.runtime.errors import ConfigError
from infalign.runtime.paths import conf_dir

__all__ = ["PRESET_GROUPS", "SOLVER_IDENTITY", "check_presets", "preset_defaults", "preset_values"]

PRESET_GROUPS = ("method", "solver", "scale")  # patches of the whole config, compared with each other
SOLVER_IDENTITY = ("rl.algo", "rl.kl_penalty")  # what makes one solver another: every solver file sets them


def _file(group: str, choice: str) -> Path:
    return Path(conf_dir()) / group / f"{choice}.yaml"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _load(group: str, choice: str) -> dict:
    """The preset file as plain data; {} for one that is not in conf/ (a user's own, on `hydra.searchpath`: it is
    composed by Hydra as usual, and compared with nothing here)."""
    path = _file(group, choice)
    return (OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}) if path.is_file() else {}


def preset_values(group: str, choice: str) -> dict[str, Any]:
    """The keys `conf/<group>/<choice>.yaml` sets (dotted, values as written), its defaults list and `hydra` aside."""
    raw = _load(group, choice)
    return _flatten({k: v for k, v in (raw or {}).items() if k not in ("defaults", "hydra")})


def preset_defaults(group: str, choice: str) -> dict[str, str]:
    """The groups `conf/<group>/<choice>.yaml` overrides in its defaults list: {"transform": "bon_exp", ...}."""
    raw, out = _load(group, choice), {}
    for entry in raw.get("defaults") or []:
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                if str(key).startswith("override /"):
                    out[str(key)[len("override /"):]] = value
    return out


def _overridden(overrides: Sequence[str]) -> dict[str, str]:
    """The command line's `key=value` overrides as {key: value} (`+key`, `++key` included; `~key` deletions too)."""
    out = {}
    for o in overrides:
        key, _, value = str(o).partition("=")
        out[key.lstrip("+~")] = value
    return out


def check_presets(choices: Mapping, overrides: Sequence[str] = ()) -> None:
    """Refuse (ConfigError, one line) presets that silently replace each other's values, and choices the command
    line contradicts (see the module docstring). `choices`: Hydra's group choices; `overrides`: the command
    line's task overrides (`hydra.overrides.task`)."""
    choices, given = dict(choices or {}), _overridden(overrides)
    chosen = [(g, choices[g]) for g in PRESET_GROUPS if choices.get(g)]
    values = {(g, c): preset_values(g, c) for g, c in chosen}
    for i, (a, ca) in enumerate(chosen):
        for b, cb in chosen[i + 1:]:
            for key in sorted(values[(a, ca)].keys() & values[(b, cb)].keys()):
                va, vb = values[(a, ca)][key], values[(b, cb)][key]
                if va != vb and key not in given:
                    raise ConfigError(f"conf/{a}/{ca}.yaml sets {key}={va} and conf/{b}/{cb}.yaml sets {key}={vb}: "
                                      f"one preset would silently replace the other's value; choose it on the "
                                      f"command line (e.g. {key}={va})")
    method = choices.get("method")
    if method:
        for group, want in preset_defaults("method", method).items():
            if group in given and given[group] != want:
                raise ConfigError(f"method={method} is transform={preset_defaults('method', method).get('transform')}"
                                  f" with calibrator={preset_defaults('method', method).get('calibrator')}, but the "
                                  f"command line sets {group}={given[group]}: drop one of them (a method preset, or "
                                  "transform= and calibrator= without it)")
    solver = choices.get("solver")
    if solver:
        own = preset_values("solver", solver)
        for key in SOLVER_IDENTITY:
            if key in given and key in own and given[key] != str(own[key]):
                others = sorted((s.stem for s in _file("solver", solver).parent.glob("*.yaml")
                                 if str(preset_values("solver", s.stem).get(key)) == given[key]),
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
