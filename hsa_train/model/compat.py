"""Every private transformers (and tokenizers) name hsa_train relies on, in one place.

A transformers release may rename any of these without notice; `tests/test_compat.py` checks each one against the
installed version and says which to update here. Nothing else in the package touches a private transformers name.

- `GenerationMixin._validate_model_kwargs`, `_update_model_kwargs_for_generation`, `_valid_auto_compile_criteria`:
  the steps of `generate` that refuse unknown inputs, extend the inputs per generated token, and decide on
  auto-compiling. `GenerationHooks` overrides them and routes each to a public hook of `HSAGenerationMixin`.
- `chat_template_utils._compile_jinja_template`: the compiled chat template, run directly for speed.
- `PretrainedConfig._attn_implementation`: which attention a (sub-)config's model runs.
- `PreTrainedModel._no_split_modules`: the decoder-layer classes (what FSDP shards one by one).
- the forward's cache argument: `cache` since transformers 5.x (`past_key_values` before, now deprecated), and the
  output's `cache` / `past_key_values`.
- `DynamicCache(ddp_cache_data=...)`, `cache.layers[i].keys / .values`, `DynamicLayer`: a KV cache taken apart
  into per-layer tensors and built again (the agent runtime cuts, pads and batches sessions' caches); `Cache(layers=
  ...)` and `DynamicLayer.update`: a cache of `RoomyLayer`s, written in place (below).
- `PreTrainedTokenizerFast._tokenizer` (`backend_tokenizer`) and its `encode_special_tokens` switch: batch
  encoding straight through the tokenizers backend, special-token text as plain text when asked.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.utils import chat_template_utils

GENERATION_STEPS = ("_validate_model_kwargs", "_update_model_kwargs_for_generation", "_valid_auto_compile_criteria")


class GenerationHooks:
    """transformers' private generation steps, each forwarded to a public hook the class below it in the MRO
    (`HSAGenerationMixin`) defines: `take_generation_inputs`, `extend_generation_inputs`, `allow_auto_compile`."""

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        # generate() hands this step a copy of its inputs: removing ours here keeps them for the forward
        self.take_generation_inputs(model_kwargs)
        super()._validate_model_kwargs(model_kwargs)

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        return self.allow_auto_compile(super()._valid_auto_compile_criteria(model_kwargs, generation_config))

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        return self.extend_generation_inputs(model_kwargs, num_new_tokens)


def compile_chat_template(source: str) -> Any:
    """The jinja Template transformers compiles a chat template into (its globals and filters included)."""
    return chat_template_utils._compile_jinja_template(source)


def attn_implementation(config: Any) -> str | dict | None:
    """The attention implementation a config's model runs (transformers keeps it private)."""
    return config._attn_implementation


def no_split_modules(model: Any) -> set[str]:
    """The class names a model declares as its repeated blocks, or none."""
    return set(getattr(model, "_no_split_modules", None) or [])


def fast_backend(tokenizer: Any) -> Any:
    """The tokenizers `Tokenizer` of a fast tokenizer, or None."""
    return getattr(tokenizer, "backend_tokenizer", None)


def encode_batch(backend: Any, texts: Sequence[str], plain: bool) -> list[Any]:
    """The backend's `Encoding` of each text (no special tokens added); `plain`: special-token text is encoded
    as ordinary text. The switch is the backend's, shared by its owner: it is put back as it was."""
    before = backend.encode_special_tokens
    backend.encode_special_tokens = plain
    try:
        return backend.encode_batch(list(texts), add_special_tokens=False)
    finally:
        backend.encode_special_tokens = before


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's (keys, values), (B, H, L, D), of a cache whose every layer holds every token (a plain dynamic
    cache, or one with room); None for any other (sliding windows, recurrent states, quantised or offloaded
    layers): those cannot be cut at a token or padded, so a caller recomputes instead."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, RoomyLayer) or not layer.is_initialized for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def cache_of(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A dynamic cache holding these per-layer (keys, values); an empty one (filled by the forward) for none."""
    return DynamicCache(ddp_cache_data=list(tensors)) if tensors else DynamicCache()


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer over buffers with room past its tokens: an update writes into the room, where
    DynamicLayer concatenates (a copy of the whole layer for every decoded token, the cost that grows with the
    conversation); full, the buffers double. `keys` / `values` are views of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        """`keys` / `values`: (B, H, capacity, D) buffers whose first `length` tokens are the cache."""
        super().__init__()
        self.buffers = (keys, values)
        self.device = keys.device
        self.is_initialized = True
        self._fill(length)

    def _fill(self, length: int) -> None:
        self.length = length
        keys, values = self.buffers
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.buffers is None:  # after a reset
            self.buffers = tuple(s.new_empty(*s.shape[:2], 0, s.shape[-1]) for s in (key_states, value_states))
            self.is_initialized = True
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.buffers[0].shape[-2]:
            capacity = max(end, 2 * self.buffers[0].shape[-2])
            self.buffers = tuple(_room(b[:, :, :start], capacity - start) for b in self.buffers)
        keys, values = self.buffers
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self._fill(end)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # as DynamicLayer: a negative count of tokens to remove
            raise ValueError(f"crop({tokens_to_remove}): give a negative number of tokens to remove")
        self._fill(max(self.length + tokens_to_remove, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buffers = tuple(b[indices] for b in self.buffers)
        self._fill(self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.buffers = tuple(b.repeat_interleave(repeats, dim=0) for b in self.buffers)
        self._fill(self.length)

    def reset(self) -> None:
        super().reset()
        self.buffers, self.length = None, 0


def _room(tensor: torch.Tensor, room: int) -> torch.Tensor:
    """`tensor` (B, H, L, D) copied into a buffer with `room` more tokens (left unset: never read)."""
    return torch.cat([tensor, tensor.new_empty(*tensor.shape[:2], room, tensor.shape[-1])], dim=2)


def roomy_cache(buffers: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> Cache:
    """A cache of `RoomyLayer`s over per-layer (keys, values) buffers whose first `length` tokens are filled."""
    return Cache(layers=[RoomyLayer(k, v, length) for k, v in buffers])


def with_room(cache: Any, room: int) -> Any:
    """The cache copied into buffers with `room` free tokens past its own (one copy, so that the next `room`
    tokens copy nothing); a cache `cache_tensors` cannot take apart, as it is."""
    tensors = cache_tensors(cache) if room > 0 else None
    if tensors is None:
        return cache
    length = tensors[0][0].shape[-2]
    buffers = [(_room(k, room), _room(v, room)) for k, v in tensors]
    return roomy_cache(buffers, length)


def cache_argument(model: Any) -> str:
    """The name the model's forward takes its KV cache by."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
