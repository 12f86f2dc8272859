"""The KV cache the sampler (`infalign.models.sampling`) and the scorer (`infalign.models.logprobs`) run models with.

`_run` calls a model with its KV cache under the keyword this transformers version takes; `_prompt_cache` computes
each prompt's keys/values once and fans them out to its k samples, with room allocated up front
(`_RoomyLayer`: a step writes only its own keys/values instead of copying the whole cache, as
`DynamicLayer.update` does). What attention sees is exactly what a dynamic cache holds.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` (transformers >= 5.2x), else the older
    `past_key_values` (deprecated since, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _run(model, cache, **inputs):
    """`model(**inputs)` with `cache` as its KV cache, under the keyword this transformers version takes."""
    return model(**inputs, **{_cache_kwarg(type(model)): cache}, use_cache=True)


class _RoomyLayer(DynamicLayer):
    """A dynamic KV-cache layer that grows into room allocated up front instead of concatenating.

    `DynamicLayer.update` copies the whole cache at every decoding step (`torch.cat`); in one default
    rollout (64 rows sharing 16 prompts of up to 192 tokens, 64 steps) those copies took 0.78 of 2.9 s
    (cProfile, one thread). Here a step writes only its own keys/values; `keys`/`values` are views of
    the filled part, so attention sees exactly what a dynamic cache holds.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        shape = (keys.shape[0], keys.shape[1], keys.shape[2] + room, keys.shape[3])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self._keys[:, :, : keys.shape[2]] = keys
        self._values[:, :, : keys.shape[2]] = values
        self.length, self.device, self.is_initialized = keys.shape[2], keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self._keys.shape[2]:
            raise RuntimeError("KV cache room exhausted: more tokens than the room allocated for them")
        self._keys[:, :, self.length: self.length + n] = key_states
        self._values[:, :, self.length: self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()


def _prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, k: int, room: int):
    """Keys/values of each prompt but its last token, computed once per prompt and repeated for its k
    samples, with `room` more positions per row (`_RoomyLayer`, for plain dynamic layers)."""
    cache = DynamicCache()
    if ids.shape[1] == 1:  # one-token prompts: nothing to cache yet; the layers start (and grow) as usual
        return cache
    _run(model.base_model, cache, input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1])
    if all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
        cache.layers = [_RoomyLayer(layer.keys.repeat_interleave(k, dim=0), layer.values.repeat_interleave(k, dim=0), room)
                        for layer in cache.layers]
    else:  # sliding-window or other special layers: their own update, repeated as they are
        cache.batch_repeat_interleave(k)
    return cache
