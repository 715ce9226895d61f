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
  into per-layer tensors and built again (the agent runtime cuts, pads and batches sessions' caches).
- `PreTrainedTokenizerFast._tokenizer` (`backend_tokenizer`) and its `encode_special_tokens` switch: batch
  encoding straight through the tokenizers backend, special-token text as plain text when asked.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
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
    cache); None for any other (sliding windows, recurrent states, quantised or offloaded layers): those cannot be
    cut at a token or padded, so a caller recomputes instead."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def cache_of(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A dynamic cache holding these per-layer (keys, values); an empty one (filled by the forward) for none."""
    return DynamicCache(ddp_cache_data=list(tensors)) if tensors else DynamicCache()


def cache_argument(model: Any) -> str:
    """The name the model's forward takes its KV cache by."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
