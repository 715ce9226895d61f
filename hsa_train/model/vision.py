"""Vision-language models (Qwen2-VL, Qwen2.5-VL, and others built the transformers way): HSA reaches the language
model only, and a batch of images becomes the inputs the model's own code expects.

Everything is found through the model's structure: the text model is the sub-model whose config is
`config.get_text_config()`, the vision tower the one whose config is `config.vision_config`, rope positions come
from whatever module defines `get_rope_index`. No architecture is named here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from hsa_train.model.compat import attn_implementation

# The config fields that name a vision model's special tokens, and the text of each in a Qwen-style vocabulary:
# a model built from a config (model.arch) gets these added to the shipped tokenizer.
VISION_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}
# Inputs of the vision side a batch may carry (SemanticCollator concatenates them over the batch's samples).
VISION_FIELDS = ("pixel_values", "image_grid_thw")


def has_image(sample: Mapping[str, Any]) -> bool:
    return sample.get("image_grid_thw") is not None and len(sample["image_grid_thw"]) > 0


def has_images(samples: Sequence[Mapping[str, Any]]) -> bool:
    return any(map(has_image, samples))


def stack_images(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The samples' images as the model takes them, in the order it meets their tokens: `pixel_values`
    (patches, dim) and `image_grid_thw` (images, 3), concatenated; nothing when no sample has an image."""
    with_images = [s for s in samples if has_image(s)]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([torch.as_tensor(s["pixel_values"], dtype=torch.float32) for s in with_images]),
        "image_grid_thw": torch.cat([torch.as_tensor(s["image_grid_thw"], dtype=torch.long) for s in with_images]),
    }


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def attn_implementation_for(model: nn.Module, name: str) -> str | dict:
    """The `set_attn_implementation` argument that gives `name` to the text model and keeps every other sub-model
    (the vision tower, an audio tower) on the attention it has: a plain name for a text-only model, else a dict
    keyed by sub-config names (nested as deep as the text config sits)."""
    config = model.config
    text = config.get_text_config(decoder=True)
    if text is config:
        return name

    def mapping(cfg) -> dict | None:
        out, found = {}, False
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is None:
                continue
            if sub is text:
                out[key], found = name, True
                continue
            nested = mapping(sub)
            if nested is not None:
                out[key], found = {"": attn_implementation(sub), **nested}, True
            else:
                out[key] = attn_implementation(sub)
        return out if found else None

    nested = mapping(config)
    if nested is None:
        raise ValueError(
            f"{type(model).__name__}: its text config is not one of its sub-configs, so HSA cannot tell the language "
            "model from the other towers"
        )
    return {"": name, **nested}


def text_attn_implementation(model: nn.Module) -> str | None:
    return attn_implementation(model.config.get_text_config(decoder=True))


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The sub-model built from `config.vision_config` (with its merger / projector when the model keeps one
    inside it), or None for a text-only model."""
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_config is None:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config is vision_config), None)


def freeze_vision(model: nn.Module) -> int:
    """Freezes the vision tower; returns how many parameters it holds (0: nothing to freeze)."""
    tower = vision_tower(model)
    if tower is None:
        return 0
    count = 0
    for param in tower.parameters():
        param.requires_grad_(False)
        count += param.numel()
    return count


def _rope_owner(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)


def media_token_ids(config: Any) -> tuple[int | None, int | None]:
    """(image token id, video token id) of a vision config (None for one it has not)."""
    image = getattr(config, "image_token_id", None)
    if image is None:
        image = getattr(config, "image_token_index", None)
    video = getattr(config, "video_token_id", None)
    return image, video


def mm_token_type_ids(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Per token 0 (text), 1 (image feature) or 2 (video feature), as a processor returns them."""
    image, video = media_token_ids(config)
    out = torch.zeros_like(input_ids, dtype=torch.int32)
    if image is not None:
        out[input_ids == image] = 1
    if video is not None:
        out[input_ids == video] = 2
    return out


def vision_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs a batch with images adds to `input_ids` (and `position_ids` for a packed batch):
    `pixel_values`, `image_grid_thw` and `mm_token_type_ids`; for a packed batch the rope positions of each
    document computed alone by the model's own `get_rope_index`, stacked under the text positions as transformers
    takes them, (4, B, L): row 0 is where each document restarts (masks and the HSA bias read it), rows 1-3 the
    temporal / height / width rope positions. A batch without images adds nothing."""
    if "image_grid_thw" not in batch:
        return {}
    config = getattr(model, "module", model).config  # DDP keeps the model in .module
    out = {name: batch[name] for name in VISION_FIELDS}
    types = mm_token_type_ids(config, batch["input_ids"])
    out["mm_token_type_ids"] = types
    if "position_ids" in batch:
        out["position_ids"] = packed_rope_positions(model, batch, types)
    return out


def packed_rope_positions(model: nn.Module, batch: dict[str, torch.Tensor], types: torch.Tensor) -> torch.Tensor:
    """(4, B, L) positions of a packed batch: each document's rope positions as if it were alone (a document
    restarts where the text positions `batch["position_ids"]` do; the padding tail is a document without images).
    `types`: the batch's `mm_token_type_ids`."""
    owner = _rope_owner(model)
    if owner is None:
        raise ValueError(f"{type(model).__name__} has images but no get_rope_index: cannot place its vision tokens")
    input_ids, text = batch["input_ids"], batch["position_ids"]
    rows, width = input_ids.shape
    rope = text[None].repeat(3, 1, 1).clone()
    grids = iter(batch["image_grid_thw"])
    for row in range(rows):
        starts = (torch.nonzero(text[row] == 0).flatten().tolist()) + [width]
        for a, b in zip(starts, starts[1:]):
            doc_types = types[row, a:b]
            runs = _runs(doc_types)
            if runs == 0:
                continue
            doc_grids = torch.stack([next(grids) for _ in range(runs)])
            positions, _ = owner.get_rope_index(
                input_ids[row : row + 1, a:b], mm_token_type_ids=doc_types[None], image_grid_thw=doc_grids
            )
            rope[:, row, a:b] = positions[:, 0]
    if next(grids, None) is not None:
        raise ValueError("the batch has more image grids than images among its tokens")
    return torch.cat([text[None], rope], dim=0)


def images_by_row(config: Any, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's own (pixel_values, image_grid_thw) of a batch whose images are concatenated in token order:
    an image is a run of image tokens (the vision wrapper keeps two images apart)."""
    types = mm_token_type_ids(config, batch["input_ids"])
    grids, pixels = batch["image_grid_thw"], batch["pixel_values"]
    patches = grids.prod(dim=1).tolist()
    out, image, patch = [], 0, 0
    for row in types:
        runs = _runs(row)
        size = sum(patches[image : image + runs])
        out.append((pixels[patch : patch + size], grids[image : image + runs]))
        image, patch = image + runs, patch + size
    return out


def image_runs(config: Any, input_ids: torch.Tensor) -> int:
    """How many images a row of token ids holds."""
    return _runs(mm_token_type_ids(config, input_ids[None])[0])


def _runs(types: torch.Tensor) -> int:
    """Runs of image tokens (kind 1) in one row's token kinds."""
    if not len(types):
        return 0
    return int(((types[1:] == 1) & (types[:-1] != 1)).sum()) + int(types[0] == 1)
