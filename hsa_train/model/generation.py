"""Generation with the bias: `model.generate(input_ids, attention_mask=..., semantic_ids=...)` on an HSA model.

transformers' `generate` refuses keyword arguments the model's forward does not name, and extends only the
inputs it knows (attention mask, position ids) as tokens are generated. `enable_hsa` therefore gives a generative
model the class `HSAGenerationMixin` + its own class (same name, so saved configs and FSDP's class naming stay as
they were): `semantic_ids` passes the check, and every generated token appends `hsa.generated_type` to them, so the
forward of each step sees one type per token of the whole sequence and the KV cache's keys keep their types.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hsa_train.model.compat import GenerationHooks
from hsa_train.model.settings import HSASettings
from hsa_train.model.vision import mm_token_type_ids, stack_images

log = logging.getLogger(__name__)

_CLASSES: dict[type, type] = {}
_told_no_compile = False


class HSAGenerationMixin(GenerationHooks):
    """`semantic_ids` as a generation input, extended by one `hsa.generated_type` id per generated token (the
    private steps of `generate` that call these hooks are `compat.GenerationHooks`)."""

    def take_generation_inputs(self, model_kwargs: dict) -> None:
        """Takes `semantic_ids` out of the inputs generate() checks against the forward's signature."""
        semantic_ids = model_kwargs.pop("semantic_ids", None)
        if semantic_ids is None:
            raise ValueError(
                "generate() on an HSA model needs semantic_ids=... for the prompt (one type id per prompt token: "
                "SemanticTokenizer.encode_prompt gives them)"
            )

    def allow_auto_compile(self, would: bool) -> bool:
        """No auto-compile: transformers would compile each step's forward (static cache, accelerator), but
        semantic_ids grow by one token a step, and every step would build a new graph (and a new CUDA graph)."""
        global _told_no_compile
        if would and not _told_no_compile:
            log.info(
                "hsa: generate's auto-compile is off for HSA models (semantic_ids grow every step, so each step "
                "would recompile); decoding runs uncompiled"
            )
            _told_no_compile = True
        return False

    def extend_generation_inputs(self, model_kwargs: dict, num_new_tokens: int) -> dict:
        """The generated tokens' types appended to `semantic_ids`: the next forward sees one per token."""
        semantic_ids = model_kwargs.get("semantic_ids")
        if semantic_ids is not None:
            semantic_ids = torch.as_tensor(semantic_ids)
            fill = semantic_ids.new_full((semantic_ids.shape[0], num_new_tokens), generated_type_id(self))
            model_kwargs["semantic_ids"] = torch.cat([semantic_ids, fill], dim=-1)
        return model_kwargs


def generated_type_id(model: nn.Module) -> int:
    return HSASettings.of(model).generated_type_id


def with_generation(model: nn.Module) -> None:
    """Gives a generative model (one with `generate`) the HSA generation mixin, once."""
    cls = type(model)
    if not hasattr(model, "generate") or issubclass(cls, HSAGenerationMixin):
        return
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            cls.__name__, (HSAGenerationMixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__}
        )
    model.__class__ = _CLASSES[cls]


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: list[dict[str, list[int]]],
    pad_token_id: int,
    pad_type_id: int,
    **generate_kwargs,
) -> list[list[int]]:
    """The tokens `model.generate` adds after each prompt ({"input_ids", "semantic_ids"}, e.g. from
    `SemanticTokenizer.encode_prompt`; a vision model's with its "pixel_values" and "image_grid_thw"), the prompts
    left-padded into one batch; padding after a row's stop token removed. `semantic_ids` go in when the model has
    HSA."""
    device = next(model.parameters()).device
    width = max(len(p["input_ids"]) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    semantic_ids = torch.full((len(prompts), width), pad_type_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt["input_ids"])
        input_ids[row, width - n :] = torch.as_tensor(prompt["input_ids"])
        semantic_ids[row, width - n :] = torch.as_tensor(prompt["semantic_ids"])
        attention_mask[row, width - n :] = 1
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if getattr(model.config, "hsa", None):
        inputs["semantic_ids"] = semantic_ids.to(device)
    images = stack_images(prompts)  # in row order, as the model meets their tokens
    if images:  # rope positions come from the model itself (its get_rope_index reads the attention mask)
        inputs |= {k: v.to(device) for k, v in images.items()}
        inputs["mm_token_type_ids"] = mm_token_type_ids(model.config, inputs["input_ids"])
    out = model.generate(**inputs, pad_token_id=pad_token_id, **generate_kwargs)
    stops = generate_kwargs.get("eos_token_id")
    stops = set(stops if isinstance(stops, (list, tuple)) else [stops] if stops is not None else [])
    replies = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, tok in enumerate(row) if tok in stops), len(row))
        replies.append(row[:cut])
    return replies
