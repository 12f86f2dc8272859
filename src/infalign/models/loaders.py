"""Model and reward configs to loader calls, with a schema check of their keys first.

Each ``conf/model/*.yaml`` and ``conf/reward/*.yaml`` names a loader function in ``_target_``; the loaders
return ``(model, tokenizer, cache entry)`` (policies) or ``(reward model, cache entry)`` (rewards).
:func:`call_loader` builds them with ``hydra.utils.instantiate(cfg, _partial_=True)`` and calls the result
with the runtime objects (data config, record lists, cache root) that a config cannot hold.

The keys a config may hold (:func:`check_loader_config`, also called by the trainer's config check before
any model loads):

- the loader's keyword parameters, less the runtime ones (:data:`RUNTIME`), which the caller passes;
- the group's documented extra keys (:data:`EXTRA_KEYS`): read elsewhere, never passed to the loader.

A parameter annotated with a ``TypedDict`` (nested settings such as ``model.sft``) allows exactly that
TypedDict's keys (and needs its required ones); one annotated with ``Literal[...]`` allows those values; a
parameter without a default must be set. Anything else is an error naming the key, the file and the known keys.

A model given by path (``name_or_path``, ``tokenizer_name_or_path``) must be a folder that exists
(:func:`infalign.runtime.model_paths.model_path_problem`, which imports neither torch nor transformers); given a
missing folder, transformers would take the text for a hub id and fail four tracebacks deep about its characters.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from infalign.models.lora import LoraSettings
from infalign.runtime import signals
from infalign.runtime.model_paths import PATH_KEYS, model_path_problem

__all__ = ["EXTRA_KEYS", "PROMPT_FORMATS", "PromptFormat", "RUNTIME", "call_loader", "check_loader_config",
           "loader_schema", "model_path_problem", "PATH_KEYS"]

PromptFormat = Literal["raw", "chat"]  # raw: the HH text as it is | chat: the tokenizer's chat template
PROMPT_FORMATS = typing.get_args(PromptFormat)
# Passed by the caller (load_policy, load_reward_model, infalign.models.build), never set in a config; each
# loader receives those it names.
RUNTIME = ("data_cfg", "model_cfg", "cache_root", "partitions", "progress")
# Keys a group's configs may hold besides the loader's parameters: {key: (annotation, who reads it)}.
EXTRA_KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "model": {"name": (str, "the config's label"),
              "prompt_format": (PromptFormat, "the trainer: how prompts are rendered for the policy "
                                              "(infalign.models.policy.format_prompts)"),
              "lora": (LoraSettings | None, "the trainer: LoRA adapters on the policy (infalign.models.lora)"),
              "gradient_checkpointing": (bool, "the trainer: the policy's update recomputes activations "
                                               "(infalign.models.lora)")},
    "reward": {"name": (str, "the config's label")},
}
_HYDRA_KEYS = ("_target_",)
_WHAT = {"model": "the reference policy", "reward": "the reward model"}  # named by a stop signal's message


def _plain(cfg: Any, missing_ok: bool = False) -> Any:
    if isinstance(cfg, DictConfig):
        # throw_on_missing: a `???` field (e.g. model.name_or_path) fails here, naming the field
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=not missing_ok)
    return dict(cfg) if isinstance(cfg, Mapping) else cfg


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _annotation(fn: Callable, name: str, raw: Any) -> Any:
    """A parameter's annotation, evaluated in the loader's module (they are strings under PEP 563)."""
    if not isinstance(raw, str):
        return raw
    try:
        return eval(raw, fn.__globals__)  # noqa: S307  (the project's own source, not config)
    except Exception:
        return Any


@functools.cache
def loader_schema(target: str, group: str) -> tuple[Callable, dict[str, Any], frozenset[str]]:
    """``(loader, {allowed key: annotation}, required keys)`` for a ``_target_`` of ``group`` (model | reward)."""
    from hydra.utils import get_method

    try:
        fn = get_method(target)
    except Exception as e:
        raise ValueError(f"{group}._target_={target!r} cannot be imported: {type(e).__name__}: {e}") from None
    keys, required = {}, set()
    for name, p in inspect.signature(fn).parameters.items():
        if name in RUNTIME:
            continue
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            raise TypeError(f"{target}: a loader lists its config keys as parameters, not **{name}")
        keys[name] = _annotation(fn, name, p.annotation)
        if p.default is p.empty:
            required.add(name)
    for name, (annotation, _) in EXTRA_KEYS[group].items():
        keys.setdefault(name, annotation)
    return fn, keys, frozenset(required)


def _unknown(full_key: str, where: str, key: str, known) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{full_key}: unknown key in {where}; known keys: {', '.join(sorted(known))}{hint}")


def _check_value(full_key: str, where: str, value: Any, annotation: Any) -> None:
    tp = _unwrap_optional(annotation)
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed and not (value is None and tp is not annotation):
            raise ValueError(f"{full_key} must be one of {', '.join(map(repr, allowed))}, got {value!r} ({where})")
    elif typing.is_typeddict(tp):
        if value is None and tp is not annotation:
            return
        if not isinstance(value, Mapping):
            raise ValueError(f"{full_key} must be a mapping of {', '.join(sorted(tp.__annotations__))}, "
                             f"got {value!r} ({where})")
        fields = typing.get_type_hints(tp)
        for key, sub in value.items():
            if key not in fields:
                raise _unknown(f"{full_key}.{key}", where, key, fields)
            _check_value(f"{full_key}.{key}", where, sub, fields[key])
        for key in sorted(tp.__required_keys__):
            if key not in value or value[key] == "???":
                raise ValueError(f"{full_key}.{key} must be set ({where})")


def check_loader_config(cfg: Mapping[str, Any], group: str, source: str | None = None) -> Callable:
    """Refuse a model / reward config with an unknown key (also nested), a value outside a ``Literal``, or
    a required key unset; returns the loader function. ``source`` (e.g. ``conf/model/tiny.yaml``) goes
    into the message."""
    where = source or f"the {group} config (conf/{group}/)"
    if not isinstance(cfg, Mapping) or not cfg.get("_target_"):
        raise ValueError(f"{group}: the config has no _target_ (use a file from conf/{group}/): {cfg!r}")
    fn, keys, required = loader_schema(str(cfg["_target_"]), group)
    present = [k for k in cfg.keys() if k not in _HYDRA_KEYS]
    for key in present:
        if key not in keys:
            raise _unknown(f"{group}.{key}", where, key, keys)
    for key in sorted(required):
        if key not in present or (isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key)):
            raise ValueError(f"{group}.{key} must be set: {fn.__name__} ({where}) needs it")
    values = _plain(cfg, missing_ok=True)
    for key in present:
        _check_value(f"{group}.{key}", where, values[key], keys[key])
    for key in PATH_KEYS:
        if key in present and (problem := model_path_problem(f"{group}.{key}", values[key])):
            raise ValueError(problem)
    return fn


def call_loader(cfg: Mapping[str, Any], group: str, **runtime: Any) -> Any:
    """``instantiate(cfg, _partial_=True)`` called with the runtime objects the loader names."""
    from hydra.utils import instantiate

    fn = check_loader_config(cfg, group)
    params = {k: v for k, v in _plain(cfg).items() if k not in EXTRA_KEYS[group]}
    loader = instantiate(params, _partial_=True, _convert_="all")
    accepted = inspect.signature(fn).parameters
    with signals.stage(f"loading {_WHAT[group]} ({group}={cfg.get('name') or cfg['_target_']})"):
        return loader(**{k: v for k, v in runtime.items() if k in accepted})
