"""Encoded samples in Arrow IPC files: written in record batches as they are made, read back memory-mapped, one
row in microseconds with no copy (the datasets library's row access converts every row to int64 Python-side, about
100x slower). A training set therefore never has to fit in Python lists."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

TOKEN_COLUMNS = ("input_ids", "labels", "semantic_ids")
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("semantic_ids", pa.list_(pa.int32())),
        ("image_grid_thw", pa.list_(pa.int32())),  # 3 per image (t, h, w patches); empty without images
        ("pixel_values", pa.list_(pa.float32())),  # the images' patches, flattened (patches x dim)
        ("answer_start", pa.int32()),  # -1: no final answer
        ("answer_end", pa.int32()),
        ("where", pa.string()),  # file:line of the record
        ("index", pa.int64()),  # the record's place in its dataset (shards are put back in this order)
        ("desirable", pa.int8()),  # a labelled sample's label (KTO): 1 desirable, 0 undesirable, -1 none
    ]
)
BATCH_ROWS = 512


@dataclass
class Sample:
    """One encoded conversation and where it came from (for error messages that name the culprit). Fields are
    int32 arrays: a Python list spends 8-byte pointers plus int objects on every token."""

    features: dict[str, np.ndarray]
    answer: tuple[int, int] | None  # token span of the final answer (for exact-match evaluation)
    where: str
    desirable: bool | None = None  # a labelled sample's label (KTO); None for everything else

    def __len__(self) -> int:
        return len(self.features["input_ids"])


def update_digest(digest: Any, features: Mapping[str, Any], desirable: bool | None = None) -> None:
    """Adds one sample to a SHA-256 of a dataset's content (what resuming compares): its token ids, labels and
    types, then its image grids and pixels when it has images, then a labelled sample's label (other samples
    digest as they always did)."""
    for name in TOKEN_COLUMNS:
        digest.update(np.ascontiguousarray(features[name], dtype=np.int32).tobytes())
        digest.update(b"|")
    grid = features.get("image_grid_thw")
    if grid is not None and len(grid):
        digest.update(np.ascontiguousarray(grid, dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.ascontiguousarray(features["pixel_values"], dtype=np.float32).tobytes())
        digest.update(b"|")
    if desirable is not None:
        digest.update(b"desirable|" if desirable else b"undesirable|")


class Writer:
    """Appends samples to an Arrow IPC file in batches of BATCH_ROWS, digesting them as they come (`digest`)."""

    def __init__(self, path: Path):
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._rows: list[tuple] = []
        self._digest = hashlib.sha256()
        self.count = 0

    def digest(self) -> str:
        """`update_digest` over the samples added so far, in order."""
        return self._digest.hexdigest()

    def add(self, sample: Sample, index: int) -> None:
        f = sample.features
        start, end = sample.answer or (-1, -1)
        tokens = [np.asarray(f[name], dtype=np.int32) for name in TOKEN_COLUMNS]
        grid = np.asarray(f.get("image_grid_thw", ()), dtype=np.int32).reshape(-1)
        pixels = np.asarray(f.get("pixel_values", ()), dtype=np.float32).reshape(-1)
        label = -1 if sample.desirable is None else int(sample.desirable)
        self._rows.append((*tokens, grid, pixels, start, end, sample.where, index, label))
        update_digest(self._digest, f, sample.desirable)
        if len(self._rows) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        columns = list(zip(*self._rows))
        arrays = [pa.array(list(col), type=SCHEMA.field(i).type) for i, col in enumerate(columns)]
        self._writer.write_batch(pa.record_batch(arrays, schema=SCHEMA))
        self.count += len(self._rows)
        self._rows = []

    def close(self) -> int:
        self._flush()
        self._writer.close()
        self._sink.close()
        return self.count


def _chunk_arrays(column: pa.ChunkedArray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values, offsets) per chunk of a list column, as zero-copy numpy views."""
    out = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy(zero_copy_only=True)
        values = chunk.values.to_numpy(zero_copy_only=True)
        out.append((values, offsets))
    return out


class EncodedSet(Sequence[Sample]):
    """The samples of one or more Arrow files (in order), memory-mapped; `order` optionally permutes rows."""

    def __init__(self, paths: Iterable[Path], order: np.ndarray | None = None):
        tables = []
        for path in paths:
            source = pa.memory_map(str(path), "r")
            tables.append(pa.ipc.open_file(source).read_all())
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        self._tokens = {name: _chunk_arrays(table.column(name)) for name in TOKEN_COLUMNS}
        self._vision = {name: _chunk_arrays(table.column(name)) for name in ("image_grid_thw", "pixel_values")}
        sizes = [len(c) for c in table.column("input_ids").chunks]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._answer = (
            np.stack([table.column("answer_start").to_numpy(), table.column("answer_end").to_numpy()], axis=1)
            if table.num_rows
            else np.zeros((0, 2), dtype=np.int32)
        )
        self._where = table.column("where")
        self.index = table.column("index").to_numpy()
        self._desirable = table.column("desirable").to_numpy()
        self.order = order
        lengths = np.concatenate([np.diff(off) for _, off in self._tokens["input_ids"]]) if sizes else np.zeros(0)
        self.lengths = (lengths if order is None else lengths[order]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def _row(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return int(self.order[i]) if self.order is not None else i

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        row = self._row(i)
        chunk = bisect_right(self._starts, row) - 1
        j = row - self._starts[chunk]
        features = {}
        for name, chunks in self._tokens.items():
            values, offsets = chunks[chunk]
            features[name] = values[offsets[j] : offsets[j + 1]].copy()  # not a view into the read-only map
        values, offsets = self._vision["image_grid_thw"][chunk]
        if offsets[j + 1] > offsets[j]:
            grid = values[offsets[j] : offsets[j + 1]].astype(np.int64).reshape(-1, 3)
            values, offsets = self._vision["pixel_values"][chunk]
            patches = int(np.prod(grid, axis=1).sum())
            features["image_grid_thw"] = grid
            features["pixel_values"] = values[offsets[j] : offsets[j + 1]].reshape(patches, -1).copy()
        start, end = (int(x) for x in self._answer[row])
        label = int(self._desirable[row])
        answer = None if start < 0 else (start, end)
        return Sample(features, answer, self._where[row].as_py(), None if label < 0 else bool(label))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]
