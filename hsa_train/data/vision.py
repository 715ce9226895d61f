"""Images in conversations: each `<image>` placeholder becomes the model's vision tokens, typed like its message.

A message's `images` (formats.py attaches them, one per placeholder, in order) are opened with Pillow and run
through the model's image processor (`pixel_values`: one row per patch; `image_grid_thw`: each image's patch grid).
The placeholder is swapped for a same-length stretch of private-use characters before the chat template renders
the conversation, and that stretch is then given as tokens: the template's vision wrapper (`<|vision_start|>` ...
`<|vision_end|>` for Qwen2-VL) around one image token per merged patch. Every one of those tokens starts at the
stretch's first character, so it takes the type of the message or span holding the placeholder (SPEC §3), and
none is ever a label.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsa_train.data.formats import IMAGE_PLACEHOLDER
from hsa_train.data.tokenizer import Encoding, SemanticTokenizer
from hsa_train.model.loading import Processing, folder_source, load_processing
from hsa_train.model.settings import model_types
from hsa_train.types import IGNORE_INDEX, SemanticTypes, one_line

# Stands in for a placeholder while the template renders: as long as "<image>" so typed spans keep their offsets,
# made of private-use characters no tokenizer merges with the text around them (the stretch is never tokenized).
SENTINEL = "\ue000" + "\ue001" * (len(IMAGE_PLACEHOLDER) - 2) + "\ue002"
_PROBE_TEXT = "probe"
IMAGE_CACHE_BYTES = 256 << 20  # processed pixels kept per process (trajectories show the same picture again)


def open_image(ref: Any):
    """A picture as an RGB PIL image: a path, a PIL image, or a datasets Image dict {"path", "bytes"}."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, Mapping):
        if ref.get("bytes"):
            ref = io.BytesIO(ref["bytes"])
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise ValueError(f"unreadable image: an image dict needs 'path' or 'bytes', it has {sorted(ref)}")
    if not isinstance(ref, (str, io.BytesIO)):
        raise ValueError(f"unreadable image: {type(ref).__name__!r} is not a path, a picture or {{'path'|'bytes'}}")
    where = ref if isinstance(ref, str) else "the image bytes"
    if isinstance(ref, str) and not Path(ref).is_file():
        raise FileNotFoundError(ref)
    try:
        with Image.open(ref) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image: {where} ({one_line(exc, 'first', 140, typed=True)})") from None


def image_key(ref: Any) -> Any:
    """What identifies a picture for the per-process cache (None: do not cache it)."""
    if isinstance(ref, str):
        path = Path(ref)
        try:
            stat = path.stat()
        except OSError:
            return None
        return (str(path), stat.st_size, stat.st_mtime_ns)
    return None


class ImageProcessing:
    """Pictures -> (pixel_values (patches, dim) float32, image_grid_thw (images, 3) int64) through the model's
    image processor; a picture already seen in this process is not decoded again."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor
        self.merge = int(getattr(image_processor, "merge_size", 1) or 1)
        self._cache: OrderedDict[Any, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # least recently used first
        self._bytes = 0
        self.files: dict[str, tuple[int, int]] = {}  # image files read: path -> (size, mtime_ns), for the cache

    def config(self) -> dict[str, Any]:
        """The processor's settings (what decides the pixels and grids: part of the data cache key)."""
        return {"class": type(self.image_processor).__name__, **self.image_processor.to_dict()}

    def one(self, ref: Any) -> tuple[np.ndarray, np.ndarray]:
        key = image_key(ref)
        if key is not None:
            self.files[key[0]] = key[1:]
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = open_image(ref)
        try:
            out = self.image_processor(images=[image], return_tensors="np")
        except ValueError as exc:  # e.g. an aspect ratio the processor cannot resize
            raise ValueError(f"image not processable: {one_line(exc, 'first', 160)}") from None
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
        budget, patch = self.max_pixels(), getattr(self.image_processor, "patch_size", None)
        if budget and patch and int(grid[0, 1] * grid[0, 2]) * patch * patch > budget:
            width, height = image.size
            raise ValueError(
                f"image too large: {width}x{height} pixels still has {int(grid[0, 1] * grid[0, 2]) * patch * patch} "
                f"after resizing > max_pixels {budget} (its aspect ratio keeps a side at the minimum); crop it, or "
                "raise model.image_processor.max_pixels"
            )
        if key is not None and pixels.nbytes <= IMAGE_CACHE_BYTES:
            self._cache[key] = (pixels, grid)
            self._bytes += pixels.nbytes
            while self._bytes > IMAGE_CACHE_BYTES:
                self._bytes -= self._cache.popitem(last=False)[1][0].nbytes
        return pixels, grid

    def max_pixels(self) -> int | None:
        """The processor's pixel budget per image (Qwen2-VL: size.longest_edge, formerly max_pixels)."""
        size = getattr(self.image_processor, "size", None) or {}
        budget = size.get("longest_edge") if isinstance(size, Mapping) else getattr(size, "longest_edge", None)
        return budget or getattr(self.image_processor, "max_pixels", None)

    def tokens_of(self, grid: np.ndarray) -> int:
        """Vision tokens of one image: its patches, merged `merge` x `merge`."""
        return int(np.prod(grid)) // (self.merge * self.merge)


def vision_wrapper(tokenizer: Any, image_token: str) -> tuple[str, str]:
    """The text the template puts around an image's tokens: what it renders for an image part, when its template
    renders content parts ("<|vision_start|>", "<|vision_end|>" for Qwen2-VL); else the tokenizer's
    `<|vision_start|>` / `<|vision_end|>` when it has them; else nothing."""
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_TEXT}]}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that reads content as a string only
        text = ""
    if isinstance(text, str) and image_token in text and _PROBE_TEXT in text:
        before, after = text.split(image_token, 1)
        after = after.split(_PROBE_TEXT, 1)[0]
        special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        prefix = next((tok for tok in special if tok and before.endswith(tok)), "")
        suffix = next((tok for tok in special if tok and after.startswith(tok)), "")
        return prefix, suffix
    vocab = tokenizer.get_vocab()
    start, end = "<|vision_start|>", "<|vision_end|>"
    return (start, end) if start in vocab and end in vocab else ("", "")


class ImageMedia:
    """The media hook a vision-language model's SemanticTokenizer is built with (`SemanticTokenizer.media`; None
    for a text model): the model's image processing, the tokens an image becomes, the filler sample that keeps
    ranks' vision towers in step, and what of it decides an encoded sample (the data cache key)."""

    def __init__(self, tokenizer: Any, image_processor: Any, image_token: str = "<|image_pad|>"):
        self.images = ImageProcessing(image_processor)
        vocab = tokenizer.get_vocab()
        if image_token not in vocab:
            raise ValueError(
                f"the tokenizer has no image token {image_token!r}: it is not a vision-language model's tokenizer"
            )
        self.image_token = image_token
        self.image_token_id = vocab[image_token]
        prefix, suffix = vision_wrapper(tokenizer, image_token)
        self.prefix_ids = [vocab[prefix]] if prefix else []
        self.suffix_ids = [vocab[suffix]] if suffix else []

    def cache_config(self) -> dict[str, Any]:
        """What, besides the tokenizer, decides an encoded sample (for the data cache key)."""
        return {"processor": self.images.config(), "wrapper": [self.prefix_ids, self.image_token_id, self.suffix_ids]}

    @property
    def token_ids(self) -> set[int]:
        """Every token id an image stands for (its wrapper and its image tokens)."""
        return {self.image_token_id, *self.prefix_ids, *self.suffix_ids}

    def image_ids(self, grid: np.ndarray) -> list[int]:
        """The tokens one image of patch grid `grid` stands for: the wrapper around one image token per merged
        patch."""
        return self.prefix_ids + [self.image_token_id] * self.images.tokens_of(grid) + self.suffix_ids

    def substitute(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[tuple]]:
        """The messages with each `<image>` placeholder swapped for the sentinel stretch and their images taken
        out, and the pictures in order: [(message, image within it, picture)]."""
        rendered: list[Mapping[str, Any]] = []
        refs: list[tuple[int, int, Any]] = []
        for k, msg in enumerate(messages):
            if msg.get("videos"):
                raise ValueError(f"video: message {k} holds videos; videos are not supported yet")
            content = msg.get("content")
            images = list(msg.get("images") or [])
            if not isinstance(content, str):
                rendered.append(msg)
                continue
            if any(ch in content for ch in set(SENTINEL)):
                raise ValueError(f"message {k}: its content holds private-use characters U+E000-U+E002")
            count = content.count(IMAGE_PLACEHOLDER)
            if count != len(images):
                raise ValueError(
                    f"placeholder count: message {k} has {count} {IMAGE_PLACEHOLDER} placeholders and "
                    f"{len(images)} images"
                )
            if count:
                msg = {**msg, "content": content.replace(IMAGE_PLACEHOLDER, SENTINEL)}
                msg.pop("images")
                refs += [(k, i, ref) for i, ref in enumerate(images)]
            rendered.append(msg)
        return rendered, refs

    def process(self, refs: Sequence[tuple[int, int, Any]]) -> tuple[list, list, list[list[int]]]:
        """Each picture's (pixels, grid, tokens), a bad one named by its message and place."""
        pixels, grids, ids = [], [], []
        for k, i, ref in refs:
            where = f"message {k} image {i}"
            try:
                p, g = self.images.one(ref)
            except FileNotFoundError as exc:
                raise ValueError(f"missing image: {where} is {exc.args[0]}, no such file") from None
            except ValueError as exc:
                raise ValueError(
                    f"{str(exc).split(':', 1)[0]}: {where}: {str(exc).split(':', 1)[-1].strip()}"
                ) from None
            pixels.append(p)
            grids.append(g)
            ids.append(self.image_ids(g))
        return pixels, grids, ids

    @staticmethod
    def stretches(text: str, ids: list[list[int]]) -> list[tuple[int, int, list[int]]]:
        """Where the rendered text holds each image's sentinel stretch, with its tokens (`tokenize`'s media)."""
        out, pos = [], 0
        for token_ids in ids:
            at = text.find(SENTINEL, pos)
            if at < 0:
                break
            out.append((at, at + len(SENTINEL), token_ids))
            pos = at + len(SENTINEL)
        if len(out) != len(ids) or text.find(SENTINEL, pos) >= 0:
            raise ValueError(
                f"the chat template rendered {text.count(SENTINEL)} of the conversation's {len(ids)} image "
                "placeholders: it changes or drops message content"
            )
        return out

    def filler(self, default_type_id: int) -> dict[str, Any]:
        """A sample that is one blank image and nothing else: no label, the default type. Under DDP / FSDP a batch
        without images gets it as an extra row, so every rank runs the vision tower in step (FSDP gathers its
        blocks on all ranks together; DDP waits for their gradients) and the row adds nothing to any loss."""
        from PIL import Image

        side = 2 * int(getattr(self.images.image_processor, "patch_size", 14)) * self.images.merge
        pixels, grid = self.images.one(Image.new("RGB", (side, side), (128, 128, 128)))
        ids = self.image_ids(grid)
        return {
            "input_ids": ids,
            "labels": [IGNORE_INDEX] * len(ids),
            "semantic_ids": [default_type_id] * len(ids),
            "pixel_values": pixels,
            "image_grid_thw": grid,
        }


class VisionSemanticTokenizer(SemanticTokenizer):
    """A SemanticTokenizer built with an `ImageMedia` hook: messages may hold `images` (one per `<image>` in their
    content); `encode_detailed` adds `pixel_values` and `image_grid_thw` to the features."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        types: Sequence[str] | None = None,
        default_type: str | None = None,
        train_on: str = "assistant",
        max_length: int | None = None,
        image_token: str = "<|image_pad|>",
        train_reasoning: bool = True,
    ):
        media = ImageMedia(tokenizer, image_processor, image_token)
        super().__init__(tokenizer, types, default_type, train_on, max_length, media, train_reasoning)

    @property
    def images(self) -> ImageProcessing:
        """The media hook's image processing (its processor, and the processed-picture cache)."""
        return self.media.images

    def encode_detailed(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> Encoding:
        rendered, refs = self.media.substitute(messages)
        pixels, grids, ids = self.media.process(refs)
        media = (lambda text: self.media.stretches(text, ids)) if ids else None
        encoding = self._encode_detailed(rendered, tools, media)
        if ids:
            encoding.features["pixel_values"] = np.concatenate(pixels)
            encoding.features["image_grid_thw"] = np.concatenate(grids)
        return encoding

    def _prompt_matches(self, input_ids: list[int], messages: Sequence[Mapping[str, Any]], tools: Any) -> bool:
        """The prompt's text tokens (vision tokens left out) decode to the render with each placeholder left out."""
        vision = self.media.token_ids
        text = self._decode([t for t in input_ids if t not in vision])
        plain = [{k: v for k, v in m.items() if k != "images"} for m in messages]
        return text == self.render(plain, add_generation_prompt=True, tools=tools).replace(IMAGE_PLACEHOLDER, "")

    def _prompt_media(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """A prompt's images: all of the conversation's (the probe reply that finds the prompt's end has none)."""
        return {k: features[k] for k in ("pixel_values", "image_grid_thw") if k in features}


def semantic_tokenizer(
    processing: Processing, types: SemanticTypes, train_on: str = "assistant", train_reasoning: bool = True
) -> SemanticTokenizer:
    """The SemanticTokenizer over a model's processing (`model.loading.load_processing`): a vision-language
    model's (one with an image processor) reads images."""
    if processing.image_processor is None:
        return SemanticTokenizer(
            processing.tokenizer, types.names, types.default, train_on, train_reasoning=train_reasoning
        )
    return VisionSemanticTokenizer(
        processing.tokenizer,
        processing.image_processor,
        types.names,
        types.default,
        train_on,
        image_token=processing.image_token,
        train_reasoning=train_reasoning,
    )


def folder_semantic_tokenizer(folder: str | Path, model: Any) -> SemanticTokenizer:
    """The SemanticTokenizer of a saved model folder (a run's model/ or adapter/) for `model`: the folder's
    tokenizer (and image processor for a vision model), the model's HSA types."""
    return semantic_tokenizer(load_processing(folder_source(folder), model.config), model_types(model))
