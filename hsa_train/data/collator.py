"""Pads a list of encoded samples into a batch (SPEC §2): each per-token field with its own padding value.
`PackedCollator` builds rows of several samples each (`data.packing`, rows from `hsa_train.data.packing.pack`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hsa_train.model.vision import has_images, stack_images
from hsa_train.types import IGNORE_INDEX, SemanticTypes

TOKEN_FIELDS = ("input_ids", "labels", "semantic_ids")  # per-token fields a sample may carry (input_ids always)


def add_vision(
    batch: dict[str, torch.Tensor], samples: Sequence[Mapping[str, Any]], filler: bool = False
) -> dict[str, torch.Tensor]:
    """The samples' images, in token order (rows in order, documents in order within a row: the order the model
    meets their image tokens in the flattened batch): `pixel_values` (patches, dim) and `image_grid_thw`
    (images, 3), concatenated. A batch without images gets neither. When the last sample is the collator's
    blank image (`filler`), `filler_tokens` says how many tokens it has: they are not data, so the
    tokens-seen count leaves them out."""
    if filler:
        batch["filler_tokens"] = torch.tensor(len(samples[-1]["input_ids"]))
    return batch | stack_images(samples)


def pad_values(who: str, pad_token_id: int | None, default_type_id: int, pad_to_multiple_of: int | None) -> dict:
    """Each per-token field's padding value (SPEC §2), after checking what a collator is given."""
    if pad_token_id is None:
        raise ValueError(f"{who}: the tokenizer has no pad token; set tokenizer.pad_token first")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"{who}: pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
    return {
        "input_ids": int(pad_token_id),
        "attention_mask": 0,
        "labels": IGNORE_INDEX,
        "semantic_ids": int(default_type_id),
    }


def filler_sample(st) -> dict[str, Any] | None:
    """What keeps ranks in step where a batch could leave some sub-model idle on one rank: for a vision model the
    media hook's blank image (no label, the default type), which a collator adds to a batch without images so
    that every rank runs the vision tower (and decoding ranks each decode one); None for a text model, whose
    every forward runs the whole model. The one filler of training, evaluation and decoding."""
    return st.media.filler(st.types.default_id) if st.media is not None else None


def bucket_length(n: int, base: int = 128) -> int:
    """The smallest of base x {1, 2, 3, 4, 6, 8, 12, 16, 24, ...} that holds `n` tokens (multiples of `base`,
    growing by 1.5x and 4/3x in turn from 4 x base): a compiled kernel per length is built ~2·log2(L / base) times
    in a run, not once per batch length, for at most a third of a batch in padding."""
    if n <= 4 * base:
        return max(1, -(-n // base)) * base
    size = 4 * base
    while size < n:
        size = size * 3 // 2 if (size // base) & (size // base - 1) == 0 else size * 4 // 3
    return size


class SemanticCollator:
    """Right- (or left-) pads `input_ids` with the pad id, `labels` with -100, `attention_mask` with 0 and
    `semantic_ids` with the default type's id, to the longest row, a multiple of `pad_to_multiple_of`, or with
    `bucket_lengths` the `bucket_length` above it (for compiled kernels that are built per shape: flex)."""

    def __init__(
        self,
        pad_token_id: int | None,
        default_type_id: int = SemanticTypes().default_id,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        bucket_lengths: bool = False,
        filler: Mapping[str, Any] | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"SemanticCollator: padding_side={padding_side!r}; use 'right' or 'left'")
        self.pad_values = pad_values("SemanticCollator", pad_token_id, default_type_id, pad_to_multiple_of)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.bucket_lengths = bucket_lengths
        self.image_filler = filler  # `filler_sample`: added to a batch without images

    @classmethod
    def from_tokenizer(
        cls,
        st,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        bucket_lengths: bool = False,
        in_step: bool = False,
    ):
        """The collator for a SemanticTokenizer's samples: its pad id and its default type, so the padding's type
        comes from the same settings as every token's. `in_step`: ranks run the model together (DDP / FSDP)."""
        filler = filler_sample(st) if in_step else None
        return cls(
            st.tokenizer.pad_token_id, st.types.default_id, pad_to_multiple_of, padding_side, bucket_lengths, filler
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SemanticCollator: empty batch")
        filler = self.image_filler is not None and not has_images(features)
        if filler:
            features = [*features, self.image_filler]  # the last row: every rank's forward runs the vision tower
        fields = [f for f in TOKEN_FIELDS if f in features[0]]
        if "input_ids" not in fields:
            raise ValueError("SemanticCollator: samples have no 'input_ids'")
        lengths = check_fields(features, fields, "SemanticCollator", "row")
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        elif self.bucket_lengths:
            width = bucket_length(width)
        batch = {}
        for f in [*fields, "attention_mask"]:  # the attention mask: a sample's own, else 1 on each of its tokens
            out = torch.full((len(features), width), self.pad_values[f], dtype=torch.long)
            for row, (feat, n) in enumerate(zip(features, lengths)):
                values = torch.as_tensor(feat[f], dtype=torch.long) if f in feat else torch.ones(n, dtype=torch.long)
                if self.padding_side == "right":
                    out[row, :n] = values
                else:
                    out[row, width - n :] = values
            batch[f] = out
        return add_vision(batch, features, filler)


def check_fields(features: Sequence[Mapping[str, Any]], fields: list[str], who: str, what: str) -> list[int]:
    """Every sample has the same per-token `fields`, each (and its attention_mask, when it has one) as long as its
    input_ids; returns those lengths."""
    lengths = []
    for row, feat in enumerate(features):
        if [f for f in TOKEN_FIELDS if f in feat] != fields:
            raise ValueError(f"{who}: {what} {row} has fields {sorted(feat)}, {what} 0 has {fields}")
        sizes = {f: len(feat[f]) for f in [*fields, "attention_mask"] if f in feat}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{who}: {what} {row} has per-token fields of different lengths {sizes}")
        lengths.append(sizes["input_ids"])
    return lengths


class PackedCollator:
    """Rows of several samples (documents) each: `collator(bins)`, each bin a list of samples' features.

    Per row: the documents one after the other, then right padding. The batch holds input_ids, labels,
    semantic_ids, attention_mask (1 on the documents' tokens, 0 on padding: for token counting only; the model
    gets position_ids instead, see `training.step.make_forward`) and position_ids:
    - position_ids restart at 0 at each document, and the padding tail counts 0..k-1 as a document of its own, so
      transformers (masking_utils.find_packed_sequence_indices) and HSA (model.context.documents_of) confine
      attention and the bias to each document, and no document attends to the padding;
    - labels are -100 at each document's first token (else the previous document's last token would learn to
      predict it: a cross-document target, which an unpacked row never has) and on the padding.

    Rows are padded to `capacity` (data.cutoff_len: fixed-size rows, whose non-pad share is the packing
    efficiency); with `capacity=None`, to the longest row rounded up to `pad_to_multiple_of`."""

    def __init__(
        self,
        pad_token_id: int | None,
        default_type_id: int = SemanticTypes().default_id,
        capacity: int | None = None,
        pad_to_multiple_of: int | None = None,
        filler: Mapping[str, Any] | None = None,
    ):
        if capacity is not None and capacity < 1:
            raise ValueError(f"PackedCollator: capacity={capacity} must be >= 1")
        self.pad_values = pad_values("PackedCollator", pad_token_id, default_type_id, pad_to_multiple_of)
        self.capacity = capacity
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_filler = filler  # as SemanticCollator's

    @classmethod
    def from_tokenizer(cls, st, capacity: int | None, pad_to_multiple_of: int | None = None, in_step: bool = False):
        """The packed collator for a SemanticTokenizer's samples (its pad id and default type)."""
        filler = filler_sample(st) if in_step else None
        return cls(st.tokenizer.pad_token_id, st.types.default_id, capacity, pad_to_multiple_of, filler)

    def __call__(self, bins: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        if not bins:
            raise ValueError("PackedCollator: empty batch")
        filler = self.image_filler is not None and not has_images([feat for docs in bins for feat in docs])
        if filler:
            bins = [*bins, [self.image_filler]]
        samples = [feat for docs in bins for feat in docs]
        if any(not docs for docs in bins):
            raise ValueError("PackedCollator: a row has no samples")
        fields = [f for f in TOKEN_FIELDS if f in samples[0]]
        if "input_ids" not in fields or "labels" not in fields:
            raise ValueError("PackedCollator: samples need 'input_ids' and 'labels'")
        lengths = check_fields(samples, fields, "PackedCollator", "sample")
        if min(lengths) < 1:
            raise ValueError("PackedCollator: a sample has no tokens")
        row_lengths, k = [], 0
        for docs in bins:
            row_lengths.append(sum(lengths[k : k + len(docs)]))
            k += len(docs)
        width = max(row_lengths)
        if self.capacity is not None:
            if width > self.capacity:
                row = row_lengths.index(width)
                raise ValueError(f"PackedCollator: row {row} holds {width} tokens > capacity {self.capacity}")
            width = self.capacity
        elif self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {f: torch.full((len(bins), width), self.pad_values[f], dtype=torch.long) for f in fields}
        batch["attention_mask"] = torch.zeros((len(bins), width), dtype=torch.long)  # 1 on the documents' tokens
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        for row, docs in enumerate(bins):
            start = 0
            for feat in docs:
                n = len(feat["input_ids"])
                for f in fields:
                    batch[f][row, start : start + n] = torch.as_tensor(feat[f], dtype=torch.long)
                batch["labels"][row, start] = IGNORE_INDEX  # never a target across documents
                positions[row, start : start + n] = torch.arange(n)
                start += n
            batch["attention_mask"][row, :start] = 1
            positions[row, start:] = torch.arange(width - start)  # the padding: a pseudo-document of its own
        batch["position_ids"] = positions
        return add_vision(batch, samples, filler)
