"""One dataset from its source to encoded samples on disk, built once: records (loader: source → format → types)
→ SemanticTokenizer → truncation to the cutoff → Arrow rows (store.py), kept under a key over everything that
decides them (cache.py) and found again by the next run.

With `num_proc` > 1, worker processes each encode every num_proc-th record into a shard of their own; the shards
are read back in record order, so the result does not depend on the number of workers. A bad record stops the
build with its file and line (the first one in record order), or is skipped and counted under on_error=skip.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsa_train.data import cache
from hsa_train.data.loader import DataError, LoadReport, Record, iter_records
from hsa_train.data.spec import DatasetSpec
from hsa_train.data.store import EncodedSet, Sample, Writer
from hsa_train.data.tokenizer import SemanticTokenizer
from hsa_train.data.truncate import FitInfo, TruncationReport, fit
from hsa_train.data.typing import TypingReport
from hsa_train.data.vision import image_key


@dataclass(frozen=True)
class Preprocess:
    """The settings (besides tokenizer, types and dataset entry) that decide what a record encodes to."""

    cutoff_len: int | None = None
    overlong: str = "error"  # truncate | drop | error
    keep_types: tuple[str, ...] = ("GLOBAL_CONDITION",)
    on_error: str = "raise"
    ignore_keys: tuple[str, ...] = ("id",)


@dataclass
class Reports:
    """What preparing a dataset kept, skipped, truncated and typed; adds up over shards and datasets."""

    load: LoadReport = field(default_factory=LoadReport)
    typing: TypingReport = field(default_factory=TypingReport)
    truncation: TruncationReport = field(default_factory=TruncationReport)
    tool_records: int = 0  # records with tools or tool calls
    images: dict[str, list[int]] = field(default_factory=dict)  # image file -> [size, mtime_ns] when read

    def merge(self, other: Reports) -> Reports:
        self.load.kept += other.load.kept
        self.load.skipped += other.load.skipped
        self.tool_records += other.tool_records
        self.images.update(other.images)
        self.typing.merge(other.typing)
        self.truncation.merge(other.truncation)
        return self

    def to_dict(self) -> dict[str, Any]:
        skipped = [[e.source, e.line, e.problem] for e in self.load.skipped]
        return {
            "load": {"kept": self.load.kept, "skipped": skipped},
            "typing": self.typing.as_dict(),
            "truncation": self.truncation.as_dict(),
            "tool_records": self.tool_records,
            "images": self.images,
        }

    def counts(self) -> dict[str, Any]:
        """The figures (no error list) for metrics.json."""
        return {
            "records": self.load.kept,
            "skipped": len(self.load.skipped),
            "truncation": self.truncation.as_dict(),
            "tokens_by_type_and_rule": self.typing.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reports:
        load = LoadReport(kept=data["load"]["kept"], skipped=[DataError(*e) for e in data["load"]["skipped"]])
        typing = TypingReport.from_dict(data["typing"])
        truncation = TruncationReport.from_dict(data["truncation"])
        return cls(load, typing, truncation, data["tool_records"], data.get("images", {}))

    def images_changed(self) -> str | None:
        """The first image file read while preparing that is gone or was written since (then the entry is
        rebuilt: its pixels are part of the samples, and the dataset file that names the image is unchanged)."""
        return next((path for path, stamp in self.images.items() if image_key(path) != (path, *stamp)), None)


def _max_chars(st: SemanticTokenizer, cutoff_len: int | None) -> int | None:
    """Content longer than this is certainly over `cutoff_len` tokens: a token decodes to at most its vocabulary
    string's length in characters (+1 for a separator a decoder may insert), and the template only adds text."""
    get_vocab = getattr(st.tokenizer, "get_vocab", None)
    if cutoff_len is None or get_vocab is None:
        return None
    return cutoff_len * (max(map(len, get_vocab()), default=0) + 1)


class RecordEncoder:
    """record -> Sample (or None when overlong=drop dropped it), adding to the reports; a bad record raises
    ValueError (the caller adds file and line)."""

    def __init__(self, st: SemanticTokenizer, pre: Preprocess, reports: Reports):
        self.st, self.pre, self.reports = st, pre, reports
        self.max_chars = _max_chars(st, pre.cutoff_len) if pre.overlong != "truncate" else None

    def __call__(self, record: Record) -> Sample | None:
        pre, st, report = self.pre, self.st, self.reports.truncation
        if self.max_chars is not None:  # refused (or dropped) before a huge text reaches the tokenizer
            chars = sum(len(m["content"]) for m in record.messages)
            if chars > self.max_chars:
                if pre.overlong == "drop":
                    report.add(FitInfo("dropped", 0, 0))  # its token count is unknown: never tokenized
                    return None
                report.add_failure()
                raise ValueError(
                    f"too long: {chars} characters > {self.max_chars} (more than data.cutoff_len={pre.cutoff_len} "
                    "tokens can hold; set data.overlong=truncate or drop, or raise data.cutoff_len)"
                )
        messages = record.messages
        if pre.cutoff_len is None:
            encoding = st.encode_detailed(messages, record.tools)
        else:
            try:
                encoding, info = fit(
                    st.encode_detailed,
                    messages,
                    record.tools,
                    pre.cutoff_len,
                    st.types.names,
                    pre.keep_types,
                    pre.overlong,
                    st.types.default,
                )
            except ValueError:
                report.add_failure()
                raise
            report.add(info)
            if encoding is None:
                return None
            if info.kept is not None:
                messages = [messages[i] for i in info.kept]
        if record.tools or any(m.get("tool_calls") for m in messages):
            self.reports.tool_records += 1
        feats = encoding.features
        self.reports.typing.add(messages, encoding.message_index, feats["semantic_ids"], st.types.names)
        arrays = {name: np.asarray(feats[name], dtype=np.int32) for name in ("input_ids", "labels", "semantic_ids")}
        arrays["attention_mask"] = np.ones(len(arrays["input_ids"]), dtype=np.int32)
        for name in ("pixel_values", "image_grid_thw"):
            if name in feats:
                arrays[name] = feats[name]
        return Sample(arrays, encoding.answer, record.where)


def _encode_shard(
    spec: DatasetSpec, st: SemanticTokenizer, pre: Preprocess, shard: int, n_shards: int, path: Path
) -> tuple[Reports, tuple[int, DataError] | None]:
    """Encodes records shard, shard + n_shards, ... of `spec` into the Arrow file `path`. Returns the reports and
    the first error with its place in record order (under on_error=raise the build stops there; the parent
    raises the earliest of all shards). Every worker reads every record; only shard 0 reports the loader's."""
    reports = Reports()
    encode = RecordEncoder(st, pre, reports)
    images = getattr(st, "images", None)
    if images is not None:
        images.files.clear()
    loader_report = reports.load if shard == 0 else LoadReport()
    writer = Writer(path)
    failed, index = None, 0
    try:
        for index, record in enumerate(iter_records(spec, st.types, pre.on_error, loader_report, pre.ignore_keys)):
            if index % n_shards != shard:
                continue
            try:
                sample = encode(record)
            except ValueError as exc:
                err = DataError(record.source, record.line, str(exc))
                if pre.on_error == "raise":
                    failed = (index, err)
                    break
                reports.load.skipped.append(err)
                continue
            if sample is not None:
                writer.add(sample, index)
    except DataError as err:  # from the loader (format, types) under on_error=raise
        failed = (index, err)
    finally:
        reports.load.kept = writer.close()
        if images is not None:
            reports.images = {path: list(stamp) for path, stamp in images.files.items()}
    return reports, failed


@dataclass
class Prepared:
    samples: EncodedSet
    reports: Reports
    name: str
    key: str
    digest: str  # SHA-256 of every sample's tokens, labels and types, in order
    cached: bool  # found in the cache (not built by this call)


def _temporary_root() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="hsa_train-data-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def dataset_key(spec: DatasetSpec, st: SemanticTokenizer, pre: Preprocess, digests: cache.FileDigests) -> str:
    return cache.entry_key(
        {
            "source": cache.source_digest(spec.path, digests),
            "spec": {k: v for k, v in asdict(spec).items() if k not in ("name", "weight")},
            "tokenizer": cache.tokenizer_digest(st.tokenizer),
            "types": [st.types.names, st.types.default],
            "train_on": st.train_on,
            "pre": [pre.cutoff_len, pre.overlong, list(pre.keep_types), pre.on_error, sorted(pre.ignore_keys)],
            "code": cache.code_digest(),
            "vision": st.vision_config() if hasattr(st, "vision_config") else None,
        }
    )


def prepare(
    spec: DatasetSpec,
    st: SemanticTokenizer,
    pre: Preprocess,
    root: Path | None,
    num_proc: int = 1,
    digests: cache.FileDigests | None = None,
) -> Prepared:
    """The encoded samples of `spec`: from the cache under `root` when there, else built (into the cache when
    `root` is set, else into a temporary folder removed at exit)."""
    digests = digests or cache.FileDigests(root)
    key = dataset_key(spec, st, pre, digests)
    digests.save()
    root = root if root is not None else _temporary_root()
    found = cache.find(root, key)
    meta = cache.read_meta(found) if found is not None else None
    reports = Reports.from_dict(meta["reports"]) if meta is not None else None
    if reports is not None and reports.images_changed():
        shutil.rmtree(found, ignore_errors=True)  # an image changed under an unchanged dataset file: rebuild
        found = None
    cached = found is not None
    if not cached:
        found = _build(spec, st, pre, root, key, num_proc)
        meta = cache.read_meta(found)
        reports = Reports.from_dict(meta["reports"])
    samples = _open(found, meta["shards"])
    return Prepared(samples, reports, spec.name, key, meta["digest"], cached)


def _open(folder: Path, n_shards: int) -> EncodedSet:
    """The samples of an entry's shards, in record order."""
    shards = [folder / f"shard_{k}.arrow" for k in range(n_shards)]
    order = np.argsort(EncodedSet(shards).index, kind="stable") if n_shards > 1 else None
    return EncodedSet(shards, order=order)


def content_digest(samples: EncodedSet) -> str:
    """SHA-256 over every sample's token ids, labels and types, in order (what resuming compares)."""
    digest = hashlib.sha256()
    for sample in samples:
        for key in ("input_ids", "labels", "semantic_ids"):
            digest.update(sample.features[key].tobytes())
            digest.update(b"|")
        for key in ("image_grid_thw", "pixel_values"):  # text samples digest as before: old checkpoints resume
            if key in sample.features:
                digest.update(sample.features[key].tobytes())
                digest.update(b"|")
    return digest.hexdigest()


def _build(spec: DatasetSpec, st: SemanticTokenizer, pre: Preprocess, root: Path, key: str, num_proc: int) -> Path:
    folder = cache.staging(root)
    try:
        paths = [folder / f"shard_{k}.arrow" for k in range(num_proc)]
        if num_proc == 1:
            results = [_encode_shard(spec, st, pre, 0, 1, paths[0])]
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (tokenizers)
            with ProcessPoolExecutor(num_proc, mp_context=ctx) as pool:
                futures = [pool.submit(_encode_shard, spec, st, pre, k, num_proc, p) for k, p in enumerate(paths)]
                results = [f.result() for f in futures]
        errors = [failed for _, failed in results if failed is not None]
        if errors:
            raise min(errors, key=lambda e: e[0])[1]
        reports = Reports()
        for rep, _ in results:
            reports.merge(rep)
        if reports.load.kept == 0:
            detail = f" ({reports.load.summary()})" if reports.load.skipped else ""
            raise ValueError(f"no usable records in {spec.name} ({spec.path}){detail}")
        meta = {"shards": num_proc, "reports": reports.to_dict(), "digest": content_digest(_open(folder, num_proc))}
        return cache.publish(folder, root, key, meta)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def prepare_all(
    specs: Sequence[DatasetSpec], st: SemanticTokenizer, pre: Preprocess, root: Path | None, num_proc: int = 1
) -> list[Prepared]:
    digests = cache.FileDigests(root)
    return [prepare(spec, st, pre, root, num_proc, digests) for spec in specs]
