"""Packing samples into rows of `capacity` tokens (`data.packing=true`, issue 9): best-fit decreasing.

Samples are taken longest first and each goes into the open row with the least room that still holds it (a new
row when none does). Rows are found by their free room: a sorted list of the distinct free amounts in use
(at most `capacity` of them) and, per amount, a heap of the rows with that much room, so a sample costs
O(log capacity + log rows) and millions of samples pack in seconds. Ties go to the lower index (samples of equal
length in index order; among rows with equal room, the oldest), so the result depends on the lengths alone.
BFD uses at most 11/9 OPT + 6/9 rows (Dósa 2007).

How a row of several samples is fed to the model (positions restarting per document, the first token of each
document unlabelled) is `hsa_train.data.collator.PackedCollator`'s business.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the samples' indices grouped into rows whose lengths sum to at most `capacity`.
    Rows are in the order they were opened (longest first sample first), each row's samples in the order they
    went in (longest first). Raises ValueError for a sample longer than `capacity` (truncate before packing) or
    of no tokens."""
    if capacity < 1:
        raise ValueError(f"packing: capacity={capacity} must be >= 1")
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if sizes.size == 0:
        return []
    if int(sizes.max()) > capacity:
        i = int(np.argmax(sizes))
        raise ValueError(
            f"packing: sample {i} has {int(sizes[i])} tokens > capacity {capacity}; truncate samples to "
            "data.cutoff_len before packing"
        )
    if int(sizes.min()) < 1:
        i = int(np.argmin(sizes))
        raise ValueError(f"packing: sample {i} has {int(sizes[i])} tokens; every sample needs at least one")
    order = np.argsort(-sizes, kind="stable").tolist()  # longest first, ties by index
    sizes_list = sizes.tolist()
    rows: list[list[int]] = []
    free_amounts: list[int] = []  # sorted distinct free room (> 0) of open rows
    rows_by_free: dict[int, list[int]] = {}  # free room -> heap of row indices
    for i in order:
        size = sizes_list[i]
        k = bisect_left(free_amounts, size)
        if k < len(free_amounts):  # the tightest row that holds it
            free = free_amounts[k]
            heap = rows_by_free[free]
            row = heapq.heappop(heap)
            if not heap:
                del rows_by_free[free]
                del free_amounts[k]
        else:
            row, free = len(rows), capacity
            rows.append([])
        rows[row].append(i)
        left = free - size
        if left > 0:
            heap = rows_by_free.get(left)
            if heap is None:
                rows_by_free[left] = [row]
                insort(free_amounts, left)
            else:
                heapq.heappush(heap, row)
    return rows


def efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Non-padding tokens over all tokens of rows of `capacity`: sum(lengths) / (len(bins) * capacity)."""
    if not bins:
        return 0.0
    used = sum(int(lengths[i]) for b in bins for i in b)
    return used / (len(bins) * capacity)
