"""Evaluation split over ranks: every rank runs the same number of forwards (each is a collective under DDP /
FSDP), every sample is evaluated exactly once, and the sums equal one process's."""

from __future__ import annotations

import math

import pytest
import torch

from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.data.dataset import Sample, eval_batches
from hsa_train.training.evaluate import eval_sums

CONVERSATION = [
    {"role": "user", "content": "Task: find the key.", "semantic_type": "GLOBAL_CONDITION"},
    {"role": "assistant", "content": "Action: go to the hallway.", "semantic_type": "KEY_EVENT"},
]


def samples(tokenizer, n: int) -> list[Sample]:
    st = SemanticTokenizer(tokenizer)
    out = []
    for i in range(n):
        conv = [dict(CONVERSATION[0]), {**CONVERSATION[1], "content": f"Action: go to room {i}."}]
        features, answer = st.encode_with_answer(conv)
        out.append(Sample(features, answer, where=f"mem:{i}"))
    return out


@pytest.mark.parametrize(("n", "batch", "world"), [(5, 2, 2), (1, 4, 2), (70, 8, 8), (3, 1, 4), (8, 8, 2)])
def test_every_rank_runs_the_same_number_of_forwards(tokenizer, n, batch, world):
    data = samples(tokenizer, n)
    collator = SemanticCollator(tokenizer.pad_token_id)
    per_rank = [list(eval_batches(data, batch, collator, rank, world)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert len(per_rank[0]) == math.ceil(math.ceil(n / world) / batch)
    rows = [
        tuple(b["input_ids"][r][b["attention_mask"][r].bool()].tolist())
        for batches in per_rank
        for b in batches
        for r in range(len(b["input_ids"]))
        if (b["labels"][r] != -100).any()  # fillers have no label
    ]
    assert sorted(rows) == sorted(tuple(s.features["input_ids"]) for s in data)  # each sample exactly once


def test_sums_over_ranks_equal_one_process(tokenizer, model_factory):
    """5 samples, batch 2, on 1, 2 and 4 simulated ranks: the per-rank sums added up are the single-process sums
    (fillers included), and the fillers change nothing."""
    from hsa_train import enable_hsa
    from hsa_train.training.step import make_forward

    data = samples(tokenizer, 5)
    collator = SemanticCollator(tokenizer.pad_token_id)
    model = enable_hsa(model_factory(vocab_size=len(tokenizer))).eval()
    forward = make_forward(model, torch.device("cpu"), None, True)
    one = eval_sums(forward, eval_batches(data, 2, collator), 3)
    for world in (2, 4):
        parts = [eval_sums(forward, eval_batches(data, 2, collator, r, world), 3) for r in range(world)]
        total = [sum(values) for values in zip(*parts)]
        assert total == pytest.approx(one, rel=1e-6, abs=1e-9)
    assert one[-4] == 5  # five answers counted, no filler among them
