"""From encoded samples to batches: a seeded eval split, an endless seeded sample order, micro-batches per rank,
and eval batches balanced over ranks."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from hsa_train.data.collator import SemanticCollator
from hsa_train.data.loader import LoadReport, Record, load_records
from hsa_train.data.prepare import Preprocess, RecordEncoder, Reports
from hsa_train.data.store import Sample
from hsa_train.data.tokenizer import SemanticTokenizer

__all__ = [
    "Sample",
    "SampleStream",
    "encode_files",
    "eval_batches",
    "filler_batch",
    "rank_micro_batches",
    "split_ids",
]


def encode_files(
    paths: Sequence[str], st: SemanticTokenizer, on_error: str = "raise", ignore_keys: Sequence[str] = ("id",)
) -> tuple[list[Sample], LoadReport]:
    """Loads and tokenizes every record of files in the messages format, in memory (no cache), refusing a record
    over `st.max_length` tokens; a record that cannot be tokenized is a bad record like any other. The training
    run goes through `prepare` instead (formats, truncation, cache); this is the small library path."""
    reports = Reports()
    encode = RecordEncoder(st, Preprocess(st.max_length, "error", (), on_error, tuple(ignore_keys)), reports)
    samples: dict[int, Sample] = {}

    def check(record: Record) -> None:
        sample = encode(record)
        if sample is not None:
            samples[id(record)] = sample

    records, report = load_records(list(paths), st.types, on_error=on_error, check=check, ignore_keys=ignore_keys)
    return [samples[id(r)] for r in records], report


def split_ids(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded hold-out of `ratio` of n ids (at least one when ratio > 0), order kept in both parts."""
    if ratio <= 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    n_eval = max(1, round(n * ratio))
    if n_eval >= n:
        raise ValueError(f"data.eval_ratio={ratio} leaves no training records out of {n}")
    held = np.zeros(n, dtype=bool)
    held[random.Random(seed).sample(range(n), n_eval)] = True
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


class SampleStream:
    """An endless seeded order over N samples: epoch e visits them in `randperm(N, seed + e)`. Batches are cut from
    this one stream, so nothing is dropped at an epoch's end, and the position (epoch, index) is all a resumed run
    needs to continue with exactly the samples the uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError("no samples to batch")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            step = min(k - len(out), self.n - self.index)
            out.extend(self._order[self.index : self.index + step])
            self.index += step
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()


def rank_micro_batches(indices: list[int], micro: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: micro-batch m of the step goes to rank m % world. Any split
    gives the same step, since the loss is normalised over the label tokens of the whole global batch."""
    chunks = [indices[i : i + micro] for i in range(0, len(indices), micro)]
    return chunks[rank::world]


def rank_chunks(items, batch_size: int, rank: int, world: int):
    """(start, chunk): rank r's share of `items` (r, r + world, ...) in chunks of `batch_size`, as many chunks on
    every rank as the busiest one needs (an empty chunk where this rank has run out: its caller runs a filler
    batch, since under DDP / FSDP every forward is a collective). `start`: the chunk's place in this rank's share."""
    mine = items[rank::world]
    n_batches = math.ceil(math.ceil(len(items) / world) / batch_size)
    for start in range(0, n_batches * batch_size, batch_size):
        yield start, mine[start : start + batch_size]


def eval_batches(samples: list[Sample], batch_size: int, collator: SemanticCollator, rank: int = 0, world: int = 1):
    """Every eval sample exactly once across ranks (rank r takes samples r, r+world, ...), in batches, and the
    same number of batches on every rank: under DDP / FSDP each forward is a collective, so a rank with fewer
    samples runs filler batches (one padding token, no label, no answer) that add nothing to any sum. Each batch
    also carries `answer_span` (B, 2): the final answer's token span per row, (-1, -1) where there is none."""
    if collator.padding_side != "right":
        raise ValueError("eval_batches needs a right-padding collator (answer spans are positions from the left)")
    for _, chunk in rank_chunks(samples, batch_size, rank, world):
        if not chunk:
            yield filler_batch(collator)
            continue
        batch = collator([s.features for s in chunk])
        spans = [s.answer or (-1, -1) for s in chunk]
        spans += [(-1, -1)] * (len(batch["input_ids"]) - len(chunk))  # a collator's filler row has no answer
        batch["answer_span"] = torch.tensor(spans, dtype=torch.long)
        yield batch


def pair_eval_batches(
    pairs, batch_size: int, collator: SemanticCollator, rank: int = 0, world: int = 1, reference=None
):
    """Every eval pair exactly once across ranks, `batch_size` pairs a batch (their chosen sides, then their
    rejected ones), and the same number of batches on every rank, as `eval_batches`: a rank with fewer pairs runs
    filler batches of one row, which hold no pair. `reference`: the pairs' precomputed reference log-probs."""
    mine_ref = reference[rank::world] if reference is not None else None
    for start, chunk in rank_chunks(pairs, batch_size, rank, world):
        if not chunk:
            yield filler_batch(collator)
            continue
        yield pair_batch(collator, chunk, mine_ref[start : start + batch_size] if mine_ref is not None else None)


def pair_batch(
    collator: SemanticCollator, pairs: Sequence[tuple[Sample, Sample]], reference: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """A batch of preference pairs: the chosen sides, then the rejected ones (pair k at rows k and n + k), and
    `pairs` = n (a collator may add a filler row after them). `reference` (n, 2): the pairs' precomputed reference
    log-probs (training.reference), then in `reference_logps`, ordered as the rows. Labelled samples (KTO: the
    pool's twos are a sample and its KL sample) give `labelled_batch`'s layout instead."""
    if pairs and pairs[0][0].desirable is not None:
        return labelled_batch(collator, pairs, reference)
    batch = collator([chosen.features for chosen, _ in pairs] + [rejected.features for _, rejected in pairs])
    batch["pairs"] = torch.tensor(len(pairs))
    if reference is not None:
        batch["reference_logps"] = torch.from_numpy(np.concatenate([reference[:, 0], reference[:, 1]]))
    return batch


def labelled_batch(
    collator: SemanticCollator, twos: Sequence[tuple[Sample, Sample]], reference: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """A batch of labelled samples (KTO): their rows, their labels in `desirable` (n,), `pairs` = n, and in `kl` the
    batch of their KL samples, collated apart (a step runs it without gradient, before its losses: kto.KTOLoss).
    `reference` (n, 2): each sample's and its KL sample's precomputed reference log-probs, then in each batch's
    `reference_logps`."""
    batch = collator([sample.features for sample, _ in twos])
    batch["kl"] = collator([kl.features for _, kl in twos])
    batch["pairs"] = torch.tensor(len(twos))
    batch["desirable"] = torch.tensor([bool(sample.desirable) for sample, _ in twos])
    if reference is not None:
        batch["reference_logps"] = torch.from_numpy(np.ascontiguousarray(reference[:, 0]))
        batch["kl"]["reference_logps"] = torch.from_numpy(np.ascontiguousarray(reference[:, 1]))
    return batch


def filler_batch(collator: SemanticCollator) -> dict[str, torch.Tensor]:
    """A batch of one row that counts for nothing: a single padding token, attended (a row with no visible key
    is undefined for some attention kernels), with no label and no answer."""
    pad = collator.pad_values
    row = {"input_ids": [pad["input_ids"]], "labels": [pad["labels"]]}
    row["semantic_ids"] = [pad["semantic_ids"]]
    batch = collator([row])
    batch["answer_span"] = torch.full((len(batch["input_ids"]), 2), -1, dtype=torch.long)
    return batch
