"""From files to encoded samples and seeded batches: loader → SemanticTokenizer → split → micro-batch stream."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hsa_train.data.collator import SemanticCollator
from hsa_train.data.loader import DataError, LoadReport, Record, load_records
from hsa_train.data.tokenizer import SemanticTokenizer


@dataclass
class Sample:
    """One encoded conversation and where it came from (for error messages that name the culprit). Fields are
    int32 arrays: a Python list spends 8-byte pointers plus int objects on every token."""

    features: dict[str, np.ndarray]
    where: str


def encode_files(
    paths: Sequence[str], st: SemanticTokenizer, on_error: str = "raise"
) -> tuple[list[Sample], LoadReport]:
    """Loads and tokenizes every record; a record that cannot be tokenized is a bad record like any other."""
    encoded: dict[int, dict[str, np.ndarray]] = {}

    def check(record: Record) -> None:
        features = st.encode(record.messages)
        encoded[id(record)] = {name: np.asarray(values, dtype=np.int32) for name, values in features.items()}

    records, report = load_records(list(paths), st.types, on_error=on_error, check=check)
    return [Sample(encoded[id(r)], r.where) for r in records], report


def split_eval(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded hold-out of `ratio` of the samples (at least one when ratio > 0), order kept in both parts."""
    if ratio <= 0:
        return samples, []
    n_eval = max(1, round(len(samples) * ratio))
    if n_eval >= len(samples):
        raise DataError(
            samples[0].where.rsplit(":", 1)[0],
            1,
            f"data.eval_ratio={ratio} leaves no training records out of {len(samples)}",
        )
    held = set(random.Random(seed).sample(range(len(samples)), n_eval))
    train = [s for i, s in enumerate(samples) if i not in held]
    evals = [s for i, s in enumerate(samples) if i in held]
    return train, evals


class BatchStream:
    """Micro-batches over the samples, reshuffled every epoch from `seed + epoch`. Nothing is dropped: the last
    batch of an epoch may be smaller. The position (epoch, index) is explicit so a run can report or resume it."""

    def __init__(
        self, samples: list[Sample], batch_size: int, collator: SemanticCollator, seed: int, shuffle: bool = True
    ):
        if not samples:
            raise ValueError("no samples to batch")
        self.samples, self.batch_size, self.collator = samples, batch_size, collator
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.samples), generator=g).tolist()

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def next(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._make_order()
        picked = [self.samples[i] for i in self._order[self.index : self.index + self.batch_size]]
        self.index += len(picked)
        return self.collator([s.features for s in picked]), [s.where for s in picked]

    def one_pass(self) -> Iterator[tuple[dict[str, torch.Tensor], list[str]]]:
        """Every sample once, in order (for evaluation)."""
        for start in range(0, len(self.samples), self.batch_size):
            picked = self.samples[start : start + self.batch_size]
            yield self.collator([s.features for s in picked]), [s.where for s in picked]
