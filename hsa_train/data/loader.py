"""Reads conversation records from JSON / JSONL files and checks them before anything is tokenized.

Every record keeps where it came from (file and line), so any later problem (a bad type, nothing to train on, too
long) can be reported as `file:line: problem`, and nothing is dropped without being counted (SPEC §5).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsa_train.types import SemanticTypes

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A problem with one record, located by file and line."""

    def __init__(self, source: str, line: int, problem: str):
        self.source, self.line, self.problem = source, line, problem
        super().__init__(f"{source}:{line}: {problem}")


@dataclass
class Record:
    messages: list[dict[str, Any]]
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class LoadReport:
    """What a load kept and what it skipped (with `on_error=skip`), by reason."""

    kept: int = 0
    skipped: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} records"
        reasons: dict[str, int] = {}
        for err in self.skipped:
            reason = err.problem.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        detail = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return f"{self.kept} records, {len(self.skipped)} skipped ({detail}); first: {self.skipped[0]}"


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, DataError(str(path), lineno, f"malformed JSON: {exc.msg} at column {exc.colno}")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Walks a top-level JSON array element by element, so each record knows its starting line."""
    decoder = json.JSONDecoder()
    i, n = 0, len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    def line_of(j: int) -> int:
        return text.count("\n", 0, j) + 1

    i = skip_ws(i)
    if i >= n or text[i] != "[":
        # A single JSON object per file is accepted as one record.
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), exc.lineno, f"malformed JSON: {exc.msg}") from None
        if skip_ws(end) != n:
            raise DataError(str(path), line_of(end), "malformed JSON: extra data after the top-level value")
        yield line_of(i), obj
        return
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        start = i
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            # After a syntax error the rest of the array cannot be split reliably: stop here, whatever on_error says.
            raise DataError(str(path), exc.lineno, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
        yield line_of(start), obj
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip_ws(i + 1) != n:
                raise DataError(str(path), line_of(i + 1), "malformed JSON: extra data after the top-level array")
            return
        raise DataError(str(path), line_of(i), "malformed JSON: expected ',' or ']' between records")


def check_messages(obj: Any, types: SemanticTypes) -> list[dict[str, Any]]:
    """The record's messages, normalised; raises ValueError with the problem otherwise."""
    if not isinstance(obj, dict):
        raise ValueError(f"malformed record: expected a JSON object with 'messages', got {type(obj).__name__}")
    if "messages" not in obj:
        hint = ""
        if "conversations" in obj:
            hint = "; it looks like ShareGPT ('conversations'), but records must be {\"messages\": [...]}"
        elif "instruction" in obj:
            hint = "; it looks like alpaca ('instruction'), but records must be {\"messages\": [...]}"
        raise ValueError(f"malformed record: no 'messages' key (keys: {sorted(obj)[:6]}){hint}")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"malformed record: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation: 'messages' is an empty list")
    out = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"malformed message {k}: expected an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"unknown role: message {k} has role {role!r} (known: {', '.join(ROLES)})")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"non-string content: message {k} has content of type {type(content).__name__}")
        stype = msg.get("semantic_type")
        if stype is not None:
            if not isinstance(stype, str) or stype not in types.names:
                raise ValueError(
                    f"unknown semantic_type: message {k} has semantic_type {stype!r} (known: {', '.join(types.names)})"
                )
        out.append({"role": role, "content": content, "semantic_type": stype})
    return out


def load_records(
    paths: list[str | Path],
    types: SemanticTypes,
    on_error: str = "raise",
    check: Callable[[Record], None] | None = None,
) -> tuple[list[Record], LoadReport]:
    """All valid records of `paths`, in file order. `check` may add a per-record test (e.g. tokenization).

    on_error="raise" stops at the first bad record with `file:line: problem`; "skip" skips and counts it.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={on_error!r}: use 'raise' or 'skip'")
    if not paths:
        raise ValueError("no data files given: set data.train_files=[path/to/file.jsonl]")
    records: list[Record] = []
    report = LoadReport()
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path} (check data.train_files / data.eval_files)")
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix not in (".json", ".jsonl"):
            raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .json or .jsonl")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(str(path), 1, f"not UTF-8 text ({exc.reason})") from None
        walker = _iter_jsonl if suffix == ".jsonl" else _iter_json_array
        for lineno, obj in walker(path, text):
            try:
                if isinstance(obj, DataError):
                    raise obj
                try:
                    record = Record(check_messages(obj, types), str(path), lineno)
                except ValueError as exc:
                    raise DataError(str(path), lineno, str(exc)) from None
                if check is not None:
                    try:
                        check(record)
                    except DataError:
                        raise
                    except ValueError as exc:
                        raise DataError(str(path), lineno, str(exc)) from None
            except DataError as err:
                if on_error == "raise":
                    raise
                report.skipped.append(err)
                continue
            records.append(record)
    report.kept = len(records)
    if not records:
        raise ValueError(
            f"no usable records in {', '.join(map(str, paths))}" + (f" ({report.summary()})" if report.skipped else "")
        )
    return records, report
