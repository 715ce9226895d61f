"""Pads a list of encoded samples into a batch (SPEC §2): each per-token field with its own padding value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hsa_train.data.tokenizer import IGNORE_INDEX
from hsa_train.types import DEFAULT_TYPE, DEFAULT_TYPES

TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "semantic_ids")


class SemanticCollator:
    """Right- (or left-) pads `input_ids` with the pad id, `labels` with -100, `attention_mask` with 0 and
    `semantic_ids` with the default type's id, to the longest row or a multiple of `pad_to_multiple_of`."""

    def __init__(
        self,
        pad_token_id: int | None,
        default_type_id: int = DEFAULT_TYPES.index(DEFAULT_TYPE),
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
    ):
        if pad_token_id is None:
            raise ValueError("SemanticCollator: the tokenizer has no pad token; set tokenizer.pad_token first")
        if padding_side not in ("right", "left"):
            raise ValueError(f"SemanticCollator: padding_side={padding_side!r}; use 'right' or 'left'")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"SemanticCollator: pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
        self.pad_values = {
            "input_ids": int(pad_token_id),
            "attention_mask": 0,
            "labels": IGNORE_INDEX,
            "semantic_ids": int(default_type_id),
        }
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    @classmethod
    def from_tokenizer(cls, st, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        """The collator for a SemanticTokenizer's samples: its pad id and its default type, so the padding's type
        comes from the same settings as every token's."""
        return cls(st.tokenizer.pad_token_id, st.types.default_id, pad_to_multiple_of, padding_side)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SemanticCollator: empty batch")
        fields = [f for f in TOKEN_FIELDS if f in features[0]]
        if "input_ids" not in fields:
            raise ValueError("SemanticCollator: samples have no 'input_ids'")
        lengths = []
        for row, feat in enumerate(features):
            if [f for f in TOKEN_FIELDS if f in feat] != fields:
                raise ValueError(f"SemanticCollator: row {row} has fields {sorted(feat)}, row 0 has {fields}")
            sizes = {f: len(feat[f]) for f in fields}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"SemanticCollator: row {row} has per-token fields of different lengths {sizes}")
            lengths.append(sizes["input_ids"])
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for f in fields:
            out = torch.full((len(features), width), self.pad_values[f], dtype=torch.long)
            for row, feat in enumerate(features):
                values = torch.as_tensor(feat[f], dtype=torch.long)
                if self.padding_side == "right":
                    out[row, : len(values)] = values
                else:
                    out[row, width - len(values) :] = values
            batch[f] = out
        return batch
