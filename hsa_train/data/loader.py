"""Reads conversation records and checks them before anything is tokenized: source -> format -> typing -> checks.

Every record keeps where it came from (file and line, or dataset and row), so any later problem (a bad type,
nothing to train on, too long) can be reported as `file:line: problem`, and nothing is dropped without being counted
(SPEC §5). Records stream: `iter_records` yields them one by one (sources.py reads files and datasets lazily).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsa_train.data.formats import Labelled, Pair, ignore_set, make_converter
from hsa_train.data.sources import DataError, check_file, iter_source, looks_local
from hsa_train.data.spec import ROLES, DatasetSpec
from hsa_train.data.typing import TypeRules
from hsa_train.types import ON_ERROR, SemanticTypes, check_choice

__all__ = [
    "ROLES",
    "DataError",
    "DatasetSpec",
    "LoadReport",
    "Record",
    "iter_records",
    "load_records",
]


@dataclass
class Record:
    """One conversation: `messages` (dicts with role, content, semantic_type, type_rule, optional spans and
    tool_calls; see formats.py), where it came from, and its tool definitions (JSON-schema dicts) or None.

    A preference pair (`ranking: true`) is two conversations that share their first `prompt_len` messages:
    `messages` ends with the chosen continuation, `rejected` with the rejected one. Both are typed alike.

    A labelled sample (KTO, `kto_tag`) has `desirable` set: its last message is the completion the label judges,
    the `prompt_len` messages before it are the prompt."""

    messages: list[dict[str, Any]]
    source: str
    line: int
    tools: list[dict[str, Any]] | None = None
    rejected: list[dict[str, Any]] | None = None
    prompt_len: int = 0
    desirable: bool | None = None

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    @property
    def is_labelled(self) -> bool:
        return self.desirable is not None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class LoadReport:
    """What a load kept, what it skipped (with `on_error=skip`) by reason, and how many rollout episodes it left
    out as unsuccessful (`successful_only`)."""

    kept: int = 0
    skipped: list[DataError] = field(default_factory=list)
    unsuccessful: int = 0

    def summary(self) -> str:
        left = f", {self.unsuccessful} unsuccessful episodes left out" if self.unsuccessful else ""
        if not self.skipped:
            return f"{self.kept} records{left}"
        reasons: dict[str, int] = {}
        for err in self.skipped:
            reason = err.problem.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        detail = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return f"{self.kept} records{left}, {len(self.skipped)} skipped ({detail}); first: {self.skipped[0]}"

    def merge(self, other: LoadReport) -> LoadReport:
        self.kept += other.kept
        self.skipped.extend(other.skipped)
        self.unsuccessful += other.unsuccessful
        return self


def _check_on_error(on_error: str) -> None:
    check_choice("data.on_error", on_error, ON_ERROR)


def iter_records(
    spec: DatasetSpec,
    types: SemanticTypes,
    on_error: str = "raise",
    report: LoadReport | None = None,
    ignore_keys: Iterable[str] = ("id",),
    check: Callable[[Record], None] | None = None,
) -> Iterator[Record]:
    """The valid records of one dataset, streamed, typed by its rules (see typing.py). `check` may add a per-record
    test (e.g. tokenization). on_error="raise" stops at the first bad record with `file:line: problem`; "skip" skips
    it and counts it in `report`. `max_samples` keeps the first N valid records. The arguments, the format and a
    local path are checked now; records are read as the iterator is consumed."""
    _check_on_error(on_error)
    if spec.successful_only:  # the episode's outcome is read, so it is no unused key
        ignore_keys = {*ignore_keys, "episode"}
    convert = make_converter(spec, types, ignore_keys)
    rules = TypeRules(spec, types)
    if not Path(spec.path).expanduser().exists() and looks_local(spec.path):
        check_file(spec.path)  # a missing local file: FileNotFoundError now, not "not on the hub" later
    return _records(spec, convert, rules, on_error, report if report is not None else LoadReport(), check)


def _records(
    spec: DatasetSpec,
    convert: Callable[[Any], Any],
    rules: TypeRules,
    on_error: str,
    report: LoadReport,
    check: Callable[[Record], None] | None,
) -> Iterator[Record]:
    kept = 0
    for source, line, obj in iter_source(spec.path, spec.split, spec.subset):
        try:
            if isinstance(obj, DataError):
                raise obj
            if spec.successful_only and not _succeeded(obj):
                report.unsuccessful += 1
                continue
            converted = convert(obj)
            if isinstance(converted, Pair):
                prompt, chosen, rejected, tools = converted
                messages, other = prompt + chosen, [dict(m) for m in prompt] + rejected
                resolve_images(messages, source)
                resolve_images(other, source)
                record = Record(rules.apply(messages), source, line, tools, rules.apply(other), len(prompt))
            elif isinstance(converted, Labelled):
                messages, tools, desirable = converted
                resolve_images(messages, source)
                record = Record(rules.apply(messages), source, line, tools, None, len(messages) - 1, desirable)
            else:
                messages, tools = converted
                resolve_images(messages, source)
                record = Record(rules.apply(messages), source, line, tools)
            if check is not None:
                check(record)
        except DataError as err:
            if on_error == "raise":
                raise
            report.skipped.append(err)
            continue
        except ValueError as exc:
            err = DataError(source, line, str(exc))
            if on_error == "raise":
                raise err from None
            report.skipped.append(err)
            continue
        report.kept += 1
        kept += 1
        yield record
        if spec.max_samples is not None and kept >= spec.max_samples:
            return


def _succeeded(obj: Any) -> bool:
    """Whether a rollout record (`python -m hsa_train.rollout`) is a successful episode; a record that is no
    episode is an error under successful_only, not a silent drop."""
    episode = obj.get("episode") if isinstance(obj, dict) else None
    if not isinstance(episode, dict) or not isinstance(episode.get("success"), bool):
        raise ValueError("successful_only: the record has no episode.success (not written by hsa_train.rollout)")
    return episode["success"]


def resolve_images(messages: list[dict[str, Any]], source: str) -> None:
    """Image paths relative to the dataset's folder (LLaMA-Factory's layout: `mllm_demo_data/1.jpg` beside
    `mllm_demo.json`) made absolute; absolute paths, in-memory pictures and `{"path", "bytes"}` dicts (a datasets
    Image column) stay as they are. A URL is refused: nothing is downloaded while preparing data."""
    base = Path(source).expanduser().parent if Path(source).expanduser().is_file() else None
    for k, msg in enumerate(messages):
        refs = msg.get("images")
        if not refs:
            continue
        out = []
        for ref in refs:
            if isinstance(ref, str):
                if ref.startswith(("http://", "https://")):
                    raise ValueError(f"remote image: message {k} names {ref}; download it and give a local path")
                path = Path(ref).expanduser()
                ref = str(base / path) if base is not None and not path.is_absolute() else str(path)
            out.append(ref)
        msg["images"] = out


def load_records(
    paths: list[str | Path],
    types: SemanticTypes,
    on_error: str = "raise",
    check: Callable[[Record], None] | None = None,
    ignore_keys: Iterable[str] = ("id",),
) -> tuple[list[Record], LoadReport]:
    """All valid records of `paths` (files in the `messages` format: data.train_files), in file order, typed by the
    default rules (explicit type, else the run's default). `check` may add a per-record test (e.g. tokenization).

    on_error="raise" stops at the first bad record with `file:line: problem`; "skip" skips and counts it.
    `ignore_keys`: record or message keys that are pure metadata; any other key the run does not use is an error.
    """
    _check_on_error(on_error)
    if not paths:
        raise ValueError("no data files given: set data.train_files=[path/to/file.jsonl]")
    ignore = ignore_set(ignore_keys)
    files = [check_file(p) for p in paths]  # every path is checked before the first (maybe long) file is read
    records: list[Record] = []
    report = LoadReport()
    for path in files:
        records.extend(iter_records(DatasetSpec(path=str(path)), types, on_error, report, ignore, check))
    if not records:
        raise ValueError(
            f"no usable records in {', '.join(map(str, paths))}" + (f" ({report.summary()})" if report.skipped else "")
        )
    return records, report
