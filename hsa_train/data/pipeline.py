"""What a run trains and evaluates on, from its config: every dataset prepared (rank 0 builds what the cache lacks,
the other ranks then read it), a seeded eval split, dataset weights, and the training rows (one sample each, or
several packed into rows of cutoff_len).

The training set is never a Python list of samples: it is an array of sample ids into memory-mapped Arrow files,
and rows are arrays of those ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hsa_train.data import cache
from hsa_train.data.collator import PackedCollator, SemanticCollator
from hsa_train.data.dataset import pair_batch, split_ids
from hsa_train.data.packing import efficiency, pack
from hsa_train.data.prepare import Preparation, Prepared, Preprocess, Reports
from hsa_train.data.spec import DatasetPlan, plan_datasets
from hsa_train.data.store import Sample
from hsa_train.data.tokenizer import SemanticTokenizer
from hsa_train.data.typing import TypingReport


class Pool(Sequence[Sample]):
    """The samples of several prepared datasets under one numbering (dataset after dataset)."""

    def __init__(self, parts: Sequence[Prepared]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p.samples) for p in self.parts]).astype(np.int64)
        self.lengths = np.concatenate([p.samples.lengths for p in self.parts]) if parts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k].samples[int(i - self.starts[k])]

    def ids_of(self, k: int) -> np.ndarray:
        return np.arange(self.starts[k], self.starts[k + 1], dtype=np.int64)


class PairPool(Sequence[tuple[Sample, Sample]]):
    """The preference pairs of a pool whose datasets hold (chosen, rejected) sample twos (prepare.py writes a pair
    as two adjacent samples): pair k is samples 2k and 2k + 1, numbered dataset after dataset like the pool."""

    def __init__(self, pool: Pool):
        odd = [p.name for p in pool.parts if len(p.samples) % 2]
        if odd:
            raise ValueError(f"dataset {odd[0]} is not preference pairs (an odd number of samples); set ranking: true")
        self.pool = pool
        self.parts = pool.parts
        self.lengths = np.maximum(pool.lengths[0::2], pool.lengths[1::2]) if len(pool) else pool.lengths

    def __len__(self) -> int:
        return len(self.pool) // 2

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.pool[2 * int(i)], self.pool[2 * int(i) + 1]

    def ids_of(self, k: int) -> np.ndarray:
        return self.pool.ids_of(k)[::2] // 2


class View(Sequence[Sample]):
    """Some samples of a pool, by id."""

    def __init__(self, pool: Pool, ids: np.ndarray):
        self.pool, self.ids = pool, np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.pool[int(j)] for j in self.ids[i]]
        return self.pool[int(self.ids[i])]


def weighted_ids(ids: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """`weight` times the ids: whole copies, then a seeded share of them for the fraction (0.5: a seeded half)."""
    whole, frac = int(weight), weight - int(weight)
    extra = round(frac * len(ids))
    picked = np.sort(np.random.default_rng(seed).permutation(len(ids))[:extra]) if extra else np.zeros(0, np.int64)
    return np.concatenate([np.tile(ids, whole), ids[picked]]).astype(np.int64)


class TrainRows:
    """The rows training steps draw from: one sample each, or (packing) several samples packed best-fit
    decreasing into rows of `capacity` tokens, documents kept apart by their position ids."""

    def __init__(self, pool: Pool | PairPool, ids: np.ndarray, collator: SemanticCollator, capacity: int | None = None):
        if capacity is not None and isinstance(pool, PairPool):
            raise ValueError("data.packing does not apply to preference pairs; set data.packing=false")
        self.pool, self.ids, self.collator = pool, ids, collator
        self.reference: np.ndarray | None = None  # pairs: each pool pair's precomputed reference log-probs
        self.packed = capacity is not None
        self.capacity = capacity
        lengths = pool.lengths[ids]
        self.tokens = int(lengths.sum())
        if self.packed:
            bins = pack(lengths.tolist(), capacity)
            self.rows = [ids[np.asarray(b, dtype=np.int64)] for b in bins]
            self.efficiency = efficiency(lengths.tolist(), bins, capacity)
            pad = collator.pad_values
            self._packer = PackedCollator(pad["input_ids"], pad["semantic_ids"], capacity, filler=collator.image_filler)
        else:
            self.rows = None
            self.efficiency = None

    def __len__(self) -> int:
        return len(self.rows) if self.packed else len(self.ids)

    def samples(self, row: int) -> list[int]:
        return [int(i) for i in self.rows[row]] if self.packed else [int(self.ids[row])]

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.packed:
            return self._packer([[self.pool[i].features for i in self.samples(r)] for r in rows])
        if isinstance(self.pool, PairPool):  # the chosen sides, then the rejected ones: pair k at k and n + k
            ids = self.ids[np.asarray(rows, dtype=np.int64)]
            reference = self.reference[ids] if self.reference is not None else None
            return pair_batch(self.collator, [self.pool[int(i)] for i in ids], reference)
        return self.collator([self.pool[int(self.ids[r])].features for r in rows])

    def where(self, rows: Sequence[int]) -> list[str]:
        if isinstance(self.pool, PairPool):
            return [self.pool[int(self.ids[r])][0].where for r in rows]
        return [self.pool[i].where for r in rows for i in self.samples(r)]

    def fingerprint(self, digests: Sequence[str]) -> dict:
        """{"samples", "rows", "sha256"}: the datasets' contents (their digests) and which samples form which
        row in which order, so a resumed run sees exactly the data it was written with."""
        h = hashlib.sha256("|".join(digests).encode())
        h.update(self.ids.tobytes())
        if self.packed:
            for row in self.rows:
                h.update(row.tobytes() + b"|")
        return {"samples": len(self.ids), "rows": len(self), "sha256": h.hexdigest()}


@dataclass
class RunData:
    train: TrainRows
    eval: Sequence[Sample]
    eval_sets: dict[str, Sequence[Sample]]
    reports: dict[str, Reports]  # by dataset name (train and eval)
    fingerprint: dict
    notes: list[str] = field(default_factory=list)  # where each dataset came from (cache or built)
    cache_root: Path | None = None  # the data cache (data.cache), which keeps precomputed reference log-probs too

    @property
    def uses_tools(self) -> bool:
        return any(rep.tool_records for rep in self.reports.values())

    def summary_lines(self) -> list[str]:
        """Per dataset: records kept / skipped, truncation, cache; then the types of the training tokens and by
        which rule they got them."""
        lines = []
        for (name, rep), note in zip(self.reports.items(), self.notes):
            lines.append(
                f"data: {name}: {rep.load.summary()}; {rep.trained.summary()}; {rep.truncation.summary()}; {note}"
            )
        typing = TypingReport.merged(rep.typing for rep in self.reports.values())
        lines.append("types of all tokens (by rule): " + typing.line())
        return lines

    def metrics(self) -> dict:
        """The data figures for metrics.json."""
        train = self.train
        return {
            "datasets": {name: rep.counts() for name, rep in self.reports.items()},
            "train_tokens": train.tokens,
            "train_rows": len(train),
            "packing_efficiency": train.efficiency,
        }


def load_run_data(
    data_cfg,
    st: SemanticTokenizer,
    collator: SemanticCollator,
    seed: int,
    on_main: Callable = lambda fn: fn(),
    plan: DatasetPlan | None = None,
    pairs: bool = False,
) -> RunData:
    """Prepares every dataset the data config names (`plan`: them resolved, as the validated run config holds
    them; else resolved here) in one pass and assembles the run's data. `on_main(fn)` runs fn on rank 0 only:
    rank 0 builds what the cache lacks, then every rank opens the entries. `pairs`: the datasets are preference
    pairs; the training rows, the split, the weights and the eval sets then count pairs, not samples."""
    d = data_cfg
    pre = Preprocess(d.cutoff_len, d.overlong, tuple(d.keep_types), d.on_error, tuple(d.ignore_keys), d.noise_window)
    root = None
    if d.cache:
        root = Path(d.cache_dir).expanduser() if d.cache_dir else cache.default_root()
    plan = plan if plan is not None else plan_datasets(d, st.types)
    train_specs, eval_specs, set_specs, everything = plan.train, plan.eval, plan.sets, plan.everything
    preparation = Preparation(st, pre, root, d.num_proc)
    keys = [preparation.key(spec) for spec in everything]
    if root is not None:  # rank 0 fills the cache; the others wait for it (None: they did not build)
        built = on_main(lambda: preparation.build_missing(everything, keys))
    else:  # no cache: each process builds its own, in a temporary folder
        built = preparation.build_missing(everything, keys)
    prepared = [preparation.open(spec, key, built is None or key not in built) for spec, key in zip(everything, keys)]
    n_train, n_eval = len(train_specs), len(eval_specs)
    group = PairPool if pairs else (lambda pool: pool)
    train_pool = group(Pool(prepared[:n_train]))
    reports: dict[str, Reports] = {}
    notes: dict[str, str] = {}
    seen: set[str] = set()
    for p in prepared:
        cached = p.cached
        if p.key in seen:  # the same dataset named twice (say, train and an eval set) is reported once
            continue
        seen.add(p.key)
        reports.setdefault(p.name, Reports()).merge(p.reports)
        notes[p.name] = f"{'from the cache' if cached else 'prepared'} ({p.key[:12]})"

    train_ids_per_set = [train_pool.ids_of(k) for k in range(n_train)]
    if eval_specs:
        eval_view: Sequence = group(Pool(prepared[n_train : n_train + n_eval]))
    else:
        kept, held = split_ids(len(train_pool), d.eval_ratio, seed)
        eval_view = View(train_pool, held)
        keep = np.zeros(len(train_pool), dtype=bool)
        keep[kept] = True
        train_ids_per_set = [ids[keep[ids]] for ids in train_ids_per_set]
    ids = np.concatenate(
        [weighted_ids(ids, spec.weight, seed + k) for k, (ids, spec) in enumerate(zip(train_ids_per_set, train_specs))]
    )
    if len(ids) == 0:
        raise ValueError("no training samples left: every record was held out, skipped or dropped")
    train = TrainRows(train_pool, ids, collator, d.cutoff_len if d.packing else None)
    pos = n_train + n_eval
    eval_sets: dict[str, Sequence[Sample]] = {}
    for name, specs in set_specs.items():
        eval_sets[name] = group(Pool(prepared[pos : pos + len(specs)]))
        pos += len(specs)
    digests = [p.digest for p in prepared[:n_train]]
    fingerprint = train.fingerprint(digests)
    return RunData(train, eval_view, eval_sets, reports, fingerprint, list(notes.values()), root)
