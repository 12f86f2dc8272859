"""The presets' files as plain YAML, and `check_presets`: the run records the chosen `method` and `solver`, so a
command line that contradicts them is refused. The preset groups set disjoint keys (tests/test_presets.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from infalign.runtime.errors import ConfigError
from infalign.runtime.paths import conf_dir

__all__ = ["check_presets", "flatten", "preset_defaults", "preset_values"]


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
    group that its defaults list composes first (conf/solver/ppo.yaml: rloo)."""
    raw, out = _load(group, choice), {}
    for entry in raw.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            out.update(preset_values(group, entry))
    return {**out, **flatten({k: v for k, v in raw.items() if k not in ("defaults", "hydra")})}


def preset_defaults(group: str, choice: str) -> dict[str, str]:
    """The groups `conf/<group>/<choice>.yaml` overrides in its defaults list: {"transform": "bon_exp", ...}."""
    return {str(k).removeprefix("override /"): v for entry in _load(group, choice).get("defaults") or []
            if isinstance(entry, Mapping) for k, v in entry.items() if str(k).startswith("override /")}


def check_presets(choices: Mapping, overrides: Sequence[str] = ()) -> None:
    """Refuse a `transform=` or `calibrator=` other than the `method=`'s; an `rl.algo` or `rl.kl_penalty` (what
    makes one solver another) other than the solver's; a `distill.*` key under a solver that does not distil."""
    given = {key.lstrip("+~"): value for key, _, value in (str(o).partition("=") for o in overrides)}
    method, solver = choices.get("method"), choices.get("solver")
    pair = preset_defaults("method", method) if method else {}
    for group, want in pair.items():
        if given.get(group, want) != want:
            raise ConfigError(f"method={method} is transform={pair.get('transform')} with calibrator="
                              f"{pair.get('calibrator')}, but the command line sets {group}={given[group]}: drop one "
                              "of them (a method preset, or transform= and calibrator= without it)")
    own = preset_values("solver", solver) if solver else {}
    for key in ("rl.algo", "rl.kl_penalty"):
        if key in given and key in own and given[key] != str(own[key]):
            fits = [p.stem for p in sorted((Path(conf_dir()) / "solver").glob("*.yaml"))
                    if str(preset_values("solver", p.stem).get(key)) == given[key]]
            raise ConfigError(f"{key}={given[key]} contradicts solver={solver} ({key}={own[key]}), which the run "
                              f"would record: choose {' or '.join(f'solver={s}' for s in fits) or 'another solver'}")
    distilling = [key for key in given if key.startswith("distill.")]
    if solver and distilling and not any(k.startswith("distill.") for k in own):
        raise ConfigError(f"{distilling[0]}={given[distilling[0]]} does nothing useful under solver={solver}, which "
                          "does not distil: choose solver=distill (distillation only) or solver=distill_rl "
                          "(distillation, then RL)")
