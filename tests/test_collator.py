"""SemanticCollator: padding value per field, both sides, multiples, and length checks."""

import pytest
import torch

from hsa_train.data import SemanticCollator

A = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "semantic_ids": [0, 1, 1]}
B = {"input_ids": [8], "attention_mask": [1], "labels": [8], "semantic_ids": [0]}


def test_right_padding_values():
    batch = SemanticCollator(pad_token_id=3)([A, B])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["semantic_ids"].tolist() == [[0, 1, 1], [0, 2, 2]]  # PROCESS_NOISE = 2 by default
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_padding_and_multiple_and_custom_default_type():
    batch = SemanticCollator(pad_token_id=0, default_type_id=1, pad_to_multiple_of=4, padding_side="left")([A, B])
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch["semantic_ids"].tolist() == [[1, 0, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]


def test_mismatched_lengths_raise():
    bad = dict(A, semantic_ids=[0, 1])
    with pytest.raises(ValueError, match="row 1 has per-token fields of different lengths"):
        SemanticCollator(pad_token_id=0)([B, bad])


def test_missing_field_and_no_pad_token_raise():
    with pytest.raises(ValueError, match="row 1 has fields"):
        SemanticCollator(pad_token_id=0)([A, {k: v for k, v in B.items() if k != "labels"}])
    with pytest.raises(ValueError, match="no pad token"):
        SemanticCollator(pad_token_id=None)
