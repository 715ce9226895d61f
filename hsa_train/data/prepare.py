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
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsa_train.data import cache
from hsa_train.data.loader import DataError, LoadReport, Record, iter_records
from hsa_train.data.pairs import encode_pair
from hsa_train.data.spec import DatasetSpec
from hsa_train.data.store import EncodedSet, Sample, Writer, update_digest
from hsa_train.data.tokenizer import SemanticTokenizer
from hsa_train.data.truncate import FitInfo, TruncationReport, fit, window_noise
from hsa_train.data.typing import TypingReport
from hsa_train.data.vision import image_key
from hsa_train.types import DEFAULT_KEEP_TYPES, IGNORE_INDEX

CODE_DIGEST = cache.code_digest()  # the code this process runs, read as it is imported (see cache.code_digest)


@dataclass(frozen=True)
class Preprocess:
    """The settings (besides tokenizer, types and dataset entry) that decide what a record encodes to."""

    cutoff_len: int | None = None
    overlong: str = "error"  # truncate | drop | error
    keep_types: tuple[str, ...] = DEFAULT_KEEP_TYPES
    on_error: str = "raise"
    ignore_keys: tuple[str, ...] = ("id",)
    noise_window: int | None = None  # observation masking: the newest N noise turns stay (truncate.window_noise)


@dataclass
class TrainedTokens:
    """How many tokens of each sample carry a loss (data.train_on decides which): a run training on the last
    turn only should see it, and a dataset whose samples train nothing shows up."""

    samples: int = 0
    tokens: int = 0
    least: int | None = None
    most: int | None = None

    def add(self, n: int) -> None:
        self.samples += 1
        self.tokens += n
        self.least = n if self.least is None else min(self.least, n)
        self.most = n if self.most is None else max(self.most, n)

    def merge(self, other: TrainedTokens) -> TrainedTokens:
        for n in (other.least, other.most):
            if n is not None:
                self.least = n if self.least is None else min(self.least, n)
                self.most = n if self.most is None else max(self.most, n)
        self.samples += other.samples
        self.tokens += other.tokens
        return self

    @property
    def mean(self) -> float | None:
        return self.tokens / self.samples if self.samples else None

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "tokens": self.tokens, "min": self.least, "max": self.most, "mean": self.mean}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainedTokens:
        return cls(data["samples"], data["tokens"], data["min"], data["max"])

    def summary(self) -> str:
        if not self.samples:
            return "trained tokens per sample: no samples"
        return f"trained tokens per sample: mean {self.mean:.1f} ({self.least}-{self.most})"


@dataclass
class Reports:
    """What preparing a dataset kept, skipped, truncated and typed; adds up over shards and datasets."""

    load: LoadReport = field(default_factory=LoadReport)
    typing: TypingReport = field(default_factory=TypingReport)
    truncation: TruncationReport = field(default_factory=TruncationReport)
    tool_records: int = 0  # records with tools or tool calls
    images: dict[str, list[int]] = field(default_factory=dict)  # image file -> [size, mtime_ns] when read
    trained: TrainedTokens = field(default_factory=TrainedTokens)

    def merge(self, other: Reports) -> Reports:
        self.load.merge(other.load)
        self.trained.merge(other.trained)
        self.tool_records += other.tool_records
        self.images.update(other.images)
        self.typing.merge(other.typing)
        self.truncation.merge(other.truncation)
        return self

    def to_dict(self) -> dict[str, Any]:
        skipped = [[e.source, e.line, e.problem] for e in self.load.skipped]
        return {
            "load": {"kept": self.load.kept, "skipped": skipped, "unsuccessful": self.load.unsuccessful},
            "typing": self.typing.as_dict(),
            "truncation": self.truncation.as_dict(),
            "tool_records": self.tool_records,
            "images": self.images,
            "trained": self.trained.as_dict(),
        }

    def counts(self) -> dict[str, Any]:
        """The figures (no error list) for metrics.json."""
        return {
            "records": self.load.kept,
            "skipped": len(self.load.skipped),
            "unsuccessful_left_out": self.load.unsuccessful,
            "truncation": self.truncation.as_dict(),
            "tokens_by_type_and_rule": self.typing.as_dict(),
            "trained_tokens_per_sample": self.trained.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reports:
        saved = data["load"]
        load = LoadReport(saved["kept"], [DataError(*e) for e in saved["skipped"]], saved.get("unsuccessful", 0))
        typing = TypingReport.from_dict(data["typing"])
        truncation = TruncationReport.from_dict(data["truncation"])
        trained = TrainedTokens.from_dict(data["trained"])
        return cls(load, typing, truncation, data["tool_records"], data.get("images", {}), trained)

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

    def __call__(self, record: Record, partner: Record | None = None) -> Sample | tuple[Sample, Sample] | None:
        """A conversation's sample; a preference pair's two (chosen, rejected); a labelled sample's two (itself, its
        KL sample: its prompt with `partner`'s completion); None when dropped."""
        pre, st, report = self.pre, self.st, self.reports.truncation
        if self.max_chars is not None:  # refused (or dropped) before a huge text reaches the tokenizer
            sides = (record.messages, record.rejected) if record.is_pair else (record.messages,)
            chars = max(sum(len(m["content"]) for m in side) for side in sides)
            if chars > self.max_chars:
                if pre.overlong == "drop":
                    report.add(FitInfo("dropped", 0, 0))  # its token count is unknown: never tokenized
                    return None
                report.add_failure()
                raise ValueError(
                    f"too long: {chars} characters > {self.max_chars} (more than data.cutoff_len={pre.cutoff_len} "
                    "tokens can hold; set data.overlong=truncate or drop, or raise data.cutoff_len)"
                )
        if record.is_pair:
            return self._pair(record, record.rejected)
        if record.is_labelled:
            return self._labelled(record, partner)
        messages = record.messages
        if pre.noise_window is not None:
            kept, masked = window_noise(messages, pre.noise_window, st.types.names, pre.keep_types, st.types.default)
            messages = [messages[i] for i in kept]
            report.turns_masked += masked
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
        return self._sample(messages, encoding, record.where)

    def _sample(self, messages: list[dict[str, Any]], encoding: Any, where: str, count: bool = True) -> Sample:
        """`count`: add it to the typing and trained-token reports (not a KL sample, which is no data of its own)."""
        feats = encoding.features
        arrays = {name: np.asarray(feats[name], dtype=np.int32) for name in ("input_ids", "labels", "semantic_ids")}
        if count:
            self.reports.typing.add(messages, encoding.message_index, feats["semantic_ids"], self.st.types.names)
            self.reports.trained.add(int((arrays["labels"] != IGNORE_INDEX).sum()))
        for name in ("pixel_values", "image_grid_thw"):
            if name in feats:
                arrays[name] = feats[name]
        return Sample(arrays, encoding.answer, where)

    def _labelled(self, record: Record, partner: Record | None) -> tuple[Sample, Sample] | None:
        """A labelled sample and its KL sample (KTO's baseline: this prompt, then the next record's completion, a
        mismatched answer whose log-prob ratio estimates the policy's drift from the reference). Both are encoded
        as the two sides of a pair, so they keep the same prompt turns; only the completions carry labels. The KL
        sample is no data of its own: it is not counted in the typing or trained-token reports."""
        if partner is None:
            raise ValueError("a labelled sample needs the next record's completion for its KL sample; none was given")
        kl = [dict(m) for m in record.messages[: record.prompt_len]] + partner.messages[partner.prompt_len :]
        try:
            two = self._pair(record, kl, count_other=False)
        except ValueError as exc:
            raise ValueError(f"{exc} (with its KL sample: its prompt and the completion of {partner.where})") from None
        if two is None:
            return None
        sample, kl_sample = two
        sample.desirable = record.desirable
        return sample, kl_sample

    def _pair(
        self, record: Record, other: list[dict[str, Any]], count_other: bool = True
    ) -> tuple[Sample, Sample] | None:
        """A record's conversation and `other` (a pair's rejected side, or a KL sample), encoded as the two sides of
        a pair (pairs.encode_pair): the same prompt turns, only the continuations trained."""
        pre, st, report = self.pre, self.st, self.reports.truncation
        if pre.noise_window is not None:
            raise ValueError("data.noise_window does not apply to preference pairs or labelled samples; set it to null")
        fit_args = {
            "types_order": st.types.names,
            "keep_types": pre.keep_types,
            "overlong": pre.overlong,
            "default_type": st.types.default,
        }
        try:
            encodings, info, prompt = encode_pair(
                st.encode_detailed,
                record.messages,
                other,
                record.prompt_len,
                record.tools,
                pre.cutoff_len,
                fit_args,
            )
        except ValueError:
            if pre.cutoff_len is not None:
                report.add_failure()
            raise
        if info is not None:
            report.add(info)
        if encodings is None:
            return None
        if record.tools or any(m.get("tool_calls") for m in (*record.messages, *other)):
            self.reports.tool_records += 1
        chosen, rejected = (
            self._sample([side[i] for i in prompt] + side[record.prompt_len :], encoding, record.where, count)
            for side, encoding, count in zip((record.messages, other), encodings, (True, count_other))
        )
        return chosen, rejected


def _encode_shard(
    spec: DatasetSpec, st: SemanticTokenizer, pre: Preprocess, shard: int, n_shards: int, path: Path
) -> tuple[Reports, tuple[int, DataError] | None, str]:
    """Encodes records shard, shard + n_shards, ... of `spec` into the Arrow file `path`. Returns the reports,
    the first error with its place in record order (under on_error=raise the build stops there; the parent
    raises the earliest of all shards) and the digest of the samples written (`Writer.digest`). Every worker
    reads every record; only shard 0 reports the loader's."""
    reports = Reports()
    encode = RecordEncoder(st, pre, reports)
    images = st.media.images if st.media is not None else None
    if images is not None:
        images.files.clear()
    loader_report = reports.load if shard == 0 else LoadReport()
    writer = Writer(path)
    failed, index, kept = None, 0, 0
    records = iter_records(spec, st.types, pre.on_error, loader_report, pre.ignore_keys)
    try:
        for index, (record, partner) in enumerate(with_partners(records, spec.labelled)):
            if index % n_shards != shard:
                continue
            try:
                sample = encode(record, partner)
            except ValueError as exc:
                err = DataError(record.source, record.line, str(exc))
                if pre.on_error == "raise":
                    failed = (index, err)
                    break
                reports.load.skipped.append(err)
                continue
            samples = () if sample is None else sample if isinstance(sample, tuple) else (sample,)
            for one in samples:  # a pair's two sides share its index; the stable sort keeps their order
                writer.add(one, index)
            kept += bool(samples)  # records, not samples: a pair is one record of two
    except DataError as err:  # from the loader (format, types) under on_error=raise
        failed = (index, err)
    finally:
        writer.close()
        reports.load.kept = kept
        if images is not None:
            reports.images = {path: list(stamp) for path, stamp in images.files.items()}
    return reports, failed, writer.digest()


def with_partners(records: Iterator[Record], labelled: bool) -> Iterator[tuple[Record, Record | None]]:
    """(record, partner): a labelled record's partner is the next valid record (the last one's is the first), whose
    completion goes after this record's prompt in its KL sample, as TRL and LLaMA-Factory mismatch them within
    a dataset. Other records have none. A labelled dataset of one record has no mismatch to make: an error."""
    if not labelled:
        yield from ((record, None) for record in records)
        return
    first = previous = None
    for record in records:
        if previous is None:
            first = record
        else:
            yield previous, record
        previous = record
    if previous is not None:
        if previous is first:
            raise DataError(previous.source, previous.line, "a labelled dataset (KTO) needs two records or more: "
                            "a sample's KL baseline takes another record's completion")  # fmt: skip
        yield previous, first


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


class Preparation:
    """One pass over a run's datasets with one tokenizer and one set of settings: what decides an entry besides
    its source (tokenizer, types, settings, this code) is digested once, each dataset's key once (`key`), what
    the cache lacks is built once (`build_missing`: rank 0 of a run), and each entry is opened once (`open`,
    shared by every dataset entry with that key). Without a cache root, entries go to a temporary folder removed
    at exit."""

    def __init__(self, st: SemanticTokenizer, pre: Preprocess, root: Path | None, num_proc: int = 1):
        self.st, self.pre, self.num_proc = st, pre, num_proc
        self.digests = cache.FileDigests(root)
        self.root = root if root is not None else _temporary_root()
        self.common = {
            "tokenizer": cache.tokenizer_digest(st.tokenizer),
            "types": [st.types.names, st.types.default],
            "train_on": st.train_on,
            **({} if st.train_reasoning else {"train_reasoning": False}),  # keys of before stay as they were
            "pre": [
                pre.cutoff_len,
                pre.overlong,
                list(pre.keep_types),
                pre.on_error,
                sorted(pre.ignore_keys),
                pre.noise_window,
            ],
            "code": CODE_DIGEST,
            "vision": st.media.cache_config() if st.media is not None else None,
        }
        self._meta: dict[str, dict[str, Any]] = {}
        self._opened: dict[str, EncodedSet] = {}

    def key(self, spec: DatasetSpec) -> str:
        """The cache key of `spec`'s entry: its source's bytes and its entry settings, with `common`."""
        spec_part = {k: v for k, v in asdict(spec).items() if k not in ("name", "weight")}
        if not spec.successful_only:  # keys stay those of caches written before the option existed
            del spec_part["successful_only"]
        key = cache.entry_key(
            {"source": cache.source_digest(spec.path, self.digests), "spec": spec_part, **self.common}
        )
        self.digests.save()
        return key

    def build_missing(self, specs: Sequence[DatasetSpec], keys: Sequence[str]) -> set[str]:
        """Builds every entry the cache lacks (or whose images changed since); returns the keys built."""
        built: set[str] = set()
        for spec, key in zip(specs, keys):
            if key in self._meta:
                continue
            found = cache.find(self.root, key)
            meta = cache.read_meta(found) if found is not None else None
            if meta is not None and Reports.from_dict(meta["reports"]).images_changed():
                shutil.rmtree(found, ignore_errors=True)  # an image changed under an unchanged dataset file
                meta = None
            if meta is None:
                meta = _build(spec, self.st, self.pre, self.root, key, self.num_proc)
                built.add(key)
            self._meta[key] = meta
        return built

    def open(self, spec: DatasetSpec, key: str, cached: bool) -> Prepared:
        """The built entry `key` of `spec`, memory-mapped (`cached`: found in the cache, not built by this run)."""
        meta = self._meta.get(key)
        if meta is None:  # another rank built it
            found = cache.find(self.root, key)
            if found is None:
                raise RuntimeError(f"the data cache has no entry {key} for {spec.name}: it was not built")
            meta = self._meta[key] = cache.read_meta(found)
        if key not in self._opened:
            self._opened[key] = _open(self.root / key, meta["shards"])
        reports = Reports.from_dict(meta["reports"])
        return Prepared(self._opened[key], reports, spec.name, key, meta["digest"], cached)


def prepare(
    spec: DatasetSpec,
    st: SemanticTokenizer,
    pre: Preprocess,
    root: Path | None,
    num_proc: int = 1,
) -> Prepared:
    """The encoded samples of one dataset: from the cache under `root` when there, else built (into the cache
    when `root` is set, else into a temporary folder removed at exit)."""
    preparation = Preparation(st, pre, root, num_proc)
    key = preparation.key(spec)
    built = preparation.build_missing([spec], [key])
    return preparation.open(spec, key, cached=key not in built)


def _open(folder: Path, n_shards: int) -> EncodedSet:
    """The samples of an entry's shards, in record order."""
    shards = [folder / f"shard_{k}.arrow" for k in range(n_shards)]
    order = np.argsort(EncodedSet(shards).index, kind="stable") if n_shards > 1 else None
    return EncodedSet(shards, order=order)


def content_digest(samples: EncodedSet) -> str:
    """`Writer.digest` of samples read back (in record order): the shards of several workers, each digested
    in its own order, interleave."""
    digest = hashlib.sha256()
    for sample in samples:
        update_digest(digest, sample.features, sample.desirable)
    return digest.hexdigest()


def _build(
    spec: DatasetSpec, st: SemanticTokenizer, pre: Preprocess, root: Path, key: str, num_proc: int
) -> dict[str, Any]:
    """Builds `spec`'s entry under `key`; returns its meta (shards, reports, digest)."""
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
        errors = [failed for _, failed, _ in results if failed is not None]
        if errors:
            raise min(errors, key=lambda e: e[0])[1]
        reports = Reports()
        for rep, _, _ in results:
            reports.merge(rep)
        if reports.load.kept == 0:
            detail = f" ({reports.load.summary()})" if reports.load.skipped else ""
            raise ValueError(f"no usable records in {spec.name} ({spec.path}){detail}")
        # one shard was digested as it was written; several interleave in record order, so they are read back
        digest = results[0][2] if num_proc == 1 else content_digest(_open(folder, num_proc))
        meta = {"shards": num_proc, "reports": reports.to_dict(), "digest": digest}
        cache.publish(folder, root, key, meta)
        return meta
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
