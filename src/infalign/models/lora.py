"""LoRA adapters on the policy (``peft``, the optional extra ``lora``) and gradient checkpointing.

``model.lora.r > 0`` trains low-rank adapters on top of the reference's weights instead of a full copy of them:

- The policy (:func:`add_lora`) is a structural copy of the reference model whose parameters and buffers *are*
  the reference's: the same tensor objects, no second copy of the weights in memory. peft injects its LoRA
  layers into the copy's target modules and freezes everything else, so only the adapters train (and only they
  have optimizer state).
- The reference is the reference model itself: the same base weights with no adapter in its path, which is
  exactly what ``PeftModel.disable_adapter()`` computes on the policy (tests/test_lora.py checks both). It is
  not the policy under ``disable_adapter()`` because the sampler (``infalign.models.sampling``) calls the
  model's ``base_model`` for the shared prompt, reads the keyword its ``forward`` takes the KV cache by and
  calls ``generate``: a plain transformers model does all of that as it is, a wrapper that switches the
  adapters around each call would have to imitate each of them.
- The adapters' initial weights come from their own seeded stream (``lora_init``), so a run starts from the same
  adapters whatever the model builds before it drew from the global generator.
- Checkpoints hold the adapter weights and their optimizer state only (the base is the model cache's);
  ``<run>/policy/`` holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``; load it with
  ``peft.AutoPeftModelForCausalLM.from_pretrained("<run>/policy")``) and, with ``model.lora.save_merged=true``,
  ``policy/merged/``: the base with the adapters merged in, a plain transformers model (built from a temporary
  copy of the policy at the end of the run, so it costs one more model's memory for a moment).
- ``model.lora.dropout`` acts in the update's forward and backward passes only (the loss; :func:`update_passes`);
  sampling, the old log-probs and the reference are computed without it, as the rest of the policy's dropout is
  (``infalign.trainer.module``). With ``rl.algo=ppo`` it perturbs the importance ratio: keep it 0 there.

``model.gradient_checkpointing=true`` (with or without LoRA; :func:`enable_gradient_checkpointing`) has the
decoder layers recompute their activations in the backward pass of the update instead of keeping them: less
memory for the larger models, one more forward pass of compute. transformers checkpoints a layer only in training
mode and the trainer keeps the policy in eval mode (no dropout), so :func:`update_passes` switches just those
layers' own flag on for the update. A checkpointed layer drops the KV cache it is given, so the update's
log-probs then run each sequence's prompt itself instead of sharing it between the k samples
(``infalign.models.logprobs.response_logprobs``).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ALL_LINEAR", "LORA_INSTALL", "adapter_parameter_names", "add_lora", "check_lora_settings",
           "check_target_modules", "enable_gradient_checkpointing", "merged_copy", "shared_copy", "update_passes"]

LORA_INSTALL = "pip install 'infalign[lora]'  (or: pip install peft)"
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head
DEFAULTS: dict[str, Any] = {"r": 0, "alpha": 16.0, "dropout": 0.0, "target_modules": ALL_LINEAR, "save_merged": False}


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_lora_settings(lora: Mapping | None) -> dict | None:
    """``model.lora`` with the defaults filled in; None when LoRA is off (absent or ``r=0``). Its values were checked
    with the rest of the config (`infalign.config`, before torch): here only that peft is installed when LoRA is
    on, before any model loads."""
    if lora is None:
        return None
    s = {**DEFAULTS, **_plain(lora)}
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


def _uses_conv1d(model: torch.nn.Module, targets) -> bool:
    """GPT-2's Conv1D stores its weight transposed: peft needs fan_in_fan_out=True for it (and warns otherwise)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and (targets == ALL_LINEAR or any(_matches(key, t) for t in targets))
               for key, m in model.named_modules())


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
    targets = settings["target_modules"]
    config = LoraConfig(r=int(settings["r"]), lora_alpha=float(settings["alpha"]),
                        lora_dropout=float(settings["dropout"]), target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=_uses_conv1d(reference, targets))
    policy = shared_copy(reference)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing`: not the user's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
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
