"""LoRA adapters on the policy (``peft``, the optional extra ``lora``) and gradient checkpointing; what they do
for a user: docs/training.md, "LoRA and gradient checkpointing".

The policy (:func:`add_lora`) is a structural copy of the reference holding the reference's very tensors, with
adapters injected: no second copy of the weights, optimizer state for the adapters only. The reference stays the
plain reference model rather than the policy under ``disable_adapter()`` (which computes the same, tested): the
sampler calls the model's ``base_model`` and reads the keyword its ``forward`` takes the KV cache by, which a plain
transformers model does as it is. LoRA's dropout and the checkpointed layers act only inside :func:`update_passes`
(the trainer keeps the policy in eval mode, where transformers would checkpoint nothing).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import OmegaConf

__all__ = ["ALL_LINEAR", "LORA_INSTALL", "adapter_parameter_names", "add_lora", "check_lora_settings",
           "check_target_modules", "enable_gradient_checkpointing", "merged_copy", "shared_copy", "update_passes"]

LORA_INSTALL = "pip install 'infalign[lora]'  (or: pip install peft)"
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head
DEFAULTS: dict[str, Any] = {"r": 0, "alpha": 16.0, "dropout": 0.0, "target_modules": ALL_LINEAR, "save_merged": False}


def check_lora_settings(lora: Mapping | None) -> dict | None:
    """``model.lora`` with the defaults filled in; None when LoRA is off (absent or ``r=0``). Its values were checked
    with the rest of the config (`infalign.config`, before torch): here only that peft is installed when LoRA is
    on, before any model loads."""
    if lora is None:
        return None
    s = {**DEFAULTS, **(OmegaConf.to_container(lora, resolve=True) if OmegaConf.is_config(lora) else lora)}
    if s["r"] == 0:
        return None
    if importlib.util.find_spec("peft") is None:
        raise ModuleNotFoundError(f"model.lora.r={s['r']} needs the peft package: {LORA_INSTALL}")
    targets = s["target_modules"]
    return {**s, "alpha": float(s["alpha"]), "dropout": float(s["dropout"]),
            "target_modules": targets if isinstance(targets, str) else list(targets)}


# ---------------------------------------------------------------------------------------------- targets
def _adaptable(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding))


def _matches(key: str, name: str) -> bool:
    return key == name or key.endswith(f".{name}")  # peft's rule for a list of names


def _layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules usually lists)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({key.rsplit(".", 1)[-1] for key, m in model.named_modules()
                   if key and isinstance(m, (torch.nn.Linear, Conv1D))})


def check_target_modules(model: torch.nn.Module, settings: Mapping) -> None:
    """Every name in ``model.lora.target_modules`` must name a linear (or embedding) layer of ``model``."""
    targets = settings["target_modules"]
    if targets == ALL_LINEAR:
        return
    modules = dict(model.named_modules())
    known = _layer_names(model)
    example = ",".join(known[:2]) if known else "..."
    for name in targets:
        hits = [key for key in modules if key and _matches(key, name)]
        if not hits:
            raise ValueError(f"model.lora.target_modules: {name!r} matches no module of {type(model).__name__}; its "
                             f"linear layers are named {', '.join(known)} (e.g. model.lora.target_modules=[{example}]), "
                             f"or use model.lora.target_modules={ALL_LINEAR}")
        bad = [key for key in hits if not _adaptable(modules[key])]
        if bad:
            raise ValueError(f"model.lora.target_modules: {name!r} matches {bad[0]} ({type(modules[bad[0]]).__name__}), "
                             f"which LoRA cannot adapt; name linear layers, e.g. model.lora.target_modules=[{example}]")


# --------------------------------------------------------------------------------------------- the policy
def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules (their own objects, config and flags) holding ``model``'s very parameters
    and buffers: changing the copy's structure (injecting adapters, checkpointing flags) leaves ``model`` as it
    is, and no weight is duplicated."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def add_lora(reference: torch.nn.Module, settings: Mapping, *, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(policy, peft_model)``: the reference's weights shared (:func:`shared_copy`) with LoRA adapters injected;
    ``policy`` is the transformers model the trainer samples from and trains (``peft_model.base_model.model``),
    ``peft_model`` the peft wrapper that saves and merges the adapters. ``seed`` seeds the adapters' init."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(reference, settings)
    config = LoraConfig(r=int(settings["r"]), lora_alpha=float(settings["alpha"]),
                        lora_dropout=float(settings["dropout"]), target_modules=settings["target_modules"],
                        bias="none", task_type="CAUSAL_LM")
    policy = shared_copy(reference)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing`, and turns fan_in_fan_out on
        # itself for GPT-2's transposed Conv1D layers, with a warning: neither is the user's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        torch.manual_seed(seed)
        peft_model = get_peft_model(policy, config)
    assert peft_model.base_model.model is policy
    policy.train(reference.training)  # the injected layers are new modules, in training mode (their dropout on)
    return policy, peft_model


def adapter_parameter_names(policy: torch.nn.Module) -> set[str]:
    """The names of the policy's trainable parameters (with LoRA: the adapters'; what checkpoints hold)."""
    return {name for name, p in policy.named_parameters() if p.requires_grad}


def merged_copy(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The base with the adapters merged in, as a plain transformers model; built from a copy of the peft model,
    so the reference's weights (which the policy shares) are never touched."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return copy.deepcopy(peft_model).merge_and_unload()


# -------------------------------------------------------------------------------- gradient checkpointing
def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing of the decoder layers (non-reentrant: works with frozen embeddings,
    LoRA and DDP); it acts only inside :func:`update_passes`."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support gradient "
                         "checkpointing; set model.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _update_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    out = []
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            out.append(m)
        dropout = getattr(m, "lora_dropout", None)  # peft's LoRA layers: {adapter: Dropout | Identity}
        if isinstance(dropout, torch.nn.ModuleDict):
            out.extend(dropout.values())
    return out


@contextmanager
def update_passes(model: torch.nn.Module) -> Iterator[None]:
    """Around the update's forward *and* backward passes (the recomputation must see the same modes): the decoder
    layers set up for gradient checkpointing checkpoint, LoRA's dropout acts; every other module keeps its mode
    (the policy's own dropout stays off). Only these modules' own flags change, not their children's."""
    switched = [(m, m.training) for m in _update_modules(model)]
    for m, _ in switched:
        m.training = True
    try:
        yield
    finally:
        for m, was in switched:
            m.training = was
