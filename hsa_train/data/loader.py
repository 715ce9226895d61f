"""Reads conversation records from JSON / JSONL files and checks them before anything is tokenized.

Every record keeps where it came from (file and line), so any later problem (a bad type, nothing to train on, too
long) can be reported as `file:line: problem`, and nothing is dropped without being counted (SPEC §5).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsa_train.types import SemanticTypes

ROLES = ("system", "user", "assistant", "tool")
RECORD_KEYS = frozenset({"messages"})
MESSAGE_KEYS = frozenset({"role", "content", "semantic_type"})


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


class _DuplicateKeys:
    """An `object_pairs_hook` that builds dicts as json does, but remembers a key given twice in one object (plain
    json keeps the last value without a word)."""

    def __init__(self) -> None:
        self.key: str | None = None

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and self.key is None:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.key = key
                    break
                seen.add(key)
        return obj

    def take(self) -> str | None:
        """The problem found since the last call, if any (and forget it)."""
        key, self.key = self.key, None
        return None if key is None else f"duplicate key: {key!r} appears twice in one object (remove one)"


def _not_utf8(exc: UnicodeDecodeError) -> str:
    column = exc.start - exc.object.rfind(b"\n", 0, exc.start)
    return f"not UTF-8 text: invalid byte 0x{exc.object[exc.start]:02x} at byte {column} of the line"


def _first_char(data: bytes) -> tuple[bytes, int]:
    """The first non-whitespace byte of `data` and its line."""
    i = re.match(rb"[ \t\r\n]*", data).end()  # type: ignore[union-attr]  # (matches at least "")
    return data[i : i + 1], data.count(b"\n", 0, i) + 1


def _iter_jsonl(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    """One record per line; a line that is not UTF-8 or not JSON is one bad record (so `skip` can skip it)."""
    first, line = _first_char(data)
    if first == b"[":
        problem = "not JSON Lines: the file looks like a JSON array (it starts with '['); rename it to .json"
        raise DataError(str(path), line, problem + ', or write one {"messages": [...]} object per line')
    dups = _DuplicateKeys()
    decoder = json.JSONDecoder(object_pairs_hook=dups)
    # Split on b"\n" only: str.splitlines() also splits on U+2028, U+0085, ... which JSON allows inside strings.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = decoder.decode(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield lineno, DataError(str(path), lineno, _not_utf8(exc))
            continue
        except json.JSONDecodeError as exc:
            dups.take()
            yield lineno, DataError(str(path), lineno, f"malformed JSON: {exc.msg} at column {exc.colno}")
            continue
        problem = dups.take()
        yield lineno, DataError(str(path), lineno, problem) if problem else obj


class _LineCounter:
    """The line of a position in `text`, counted on from the last one asked (so a walk over a big file stays
    linear)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _iter_json_array(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    """Walks a top-level JSON array element by element, so each record knows its starting line. A problem the walk
    cannot step over (bad bytes, a syntax error) stops it, whatever on_error says."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), data.count(b"\n", 0, exc.start) + 1, _not_utf8(exc)) from None
    dups = _DuplicateKeys()
    decoder = json.JSONDecoder(object_pairs_hook=dups)
    n = len(text)
    line_of = _LineCounter(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    def decode(j: int) -> tuple[Any, int]:
        try:
            obj, end = decoder.raw_decode(text, j)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), exc.lineno, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
        problem = dups.take()
        return (DataError(str(path), line_of(j), problem) if problem else obj), end

    i = skip_ws(0)
    if i >= n or text[i] != "[":  # a single JSON object per file is accepted as one record
        obj, end = decode(i)
        if skip_ws(end) != n:
            problem = "malformed JSON: extra data after the top-level value (one object per line is JSON Lines"
            raise DataError(str(path), line_of(end), problem + ": name the file .jsonl)")
        yield line_of(i), obj
        return
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        start = i
        obj, i = decode(i)
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


# Why a key the run does not use is refused (the data it carries would be dropped), by key.
_VISION = "vision data is not supported yet"
_WEIGHTS = "per-record and per-message loss weights are not supported; roles and data.train_on decide what trains"
_TOOL_CALLS = "tool calls are not rendered; write the call into the assistant's content"
_UNUSED_HINTS = {
    "images": _VISION,
    "image": _VISION,
    "videos": _VISION,
    "video": _VISION,
    "audios": "audio data is not supported yet",
    "audio": "audio data is not supported yet",
    "tools": "tool definitions are not rendered; describe the tools in a system message",
    "system": "a record-level system prompt is not rendered; make it a first message with role 'system'",
    "loss_weight": _WEIGHTS,
    "weight": _WEIGHTS,
    "loss": _WEIGHTS,
    "tool_calls": _TOOL_CALLS,
    "function_call": _TOOL_CALLS,
    "tool_call_id": "tool call ids are not rendered",
    "name": "message names are not rendered",
    "reasoning_content": "reasoning is not rendered separately; put it in the content",
}


def _unused_keys(obj: dict[str, Any], used: frozenset[str], ignore: frozenset[str], where: str) -> None:
    """Refuses keys that carry data the run would drop. None (or an empty string, list or object) carries none."""
    if obj.keys() <= used:
        return
    unused = [k for k, v in obj.items() if k not in used and k not in ignore and v not in (None, "", [], {})]
    if not unused:
        return
    hints = "; ".join(dict.fromkeys(_UNUSED_HINTS[k] for k in unused if k in _UNUSED_HINTS))
    raise ValueError(
        f"unused key: {where} has {', '.join(map(repr, unused))}, not used by training"
        + (f" ({hints})" if hints else "")
        + "; remove it, or list it in data.ignore_keys if it is only metadata"
    )


def _ignore_set(ignore_keys: Iterable[str]) -> frozenset[str]:
    if isinstance(ignore_keys, str) or not all(isinstance(k, str) for k in ignore_keys):
        raise ValueError(f"data.ignore_keys={ignore_keys!r}: give a list of key names, e.g. [id, source]")
    return frozenset(ignore_keys)


def check_messages(obj: Any, types: SemanticTypes, ignore_keys: Iterable[str] = ("id",)) -> list[dict[str, Any]]:
    """The record's messages, normalised; raises ValueError with the problem otherwise. A key other than
    `messages` (record) or role/content/semantic_type (message) is refused unless it is in `ignore_keys`."""
    if not isinstance(obj, dict):
        raise ValueError(f"malformed record: expected a JSON object with 'messages', got {type(obj).__name__}")
    if "messages" not in obj:
        hint = ""
        if "conversations" in obj:
            hint = "; it looks like ShareGPT ('conversations'), but records must be {\"messages\": [...]}"
        elif "instruction" in obj:
            hint = "; it looks like alpaca ('instruction'), but records must be {\"messages\": [...]}"
        raise ValueError(f"malformed record: no 'messages' key (keys: {sorted(obj)[:6]}){hint}")
    ignore = ignore_keys if isinstance(ignore_keys, frozenset) else _ignore_set(ignore_keys)
    _unused_keys(obj, RECORD_KEYS, ignore, "the record")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"malformed record: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation: 'messages' is an empty list")
    return [_check_message(k, msg, types, ignore) for k, msg in enumerate(messages)]


def _check_message(k: int, msg: Any, types: SemanticTypes, ignore: frozenset[str]) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise ValueError(f"malformed message {k}: expected an object, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"unknown role: message {k} has role {role!r} (known: {', '.join(ROLES)})")
    content = msg.get("content")
    if not isinstance(content, str):
        raise ValueError(f"non-string content: message {k} has content of type {type(content).__name__}")
    stype = msg.get("semantic_type")
    if stype is not None and (not isinstance(stype, str) or stype not in types.names):
        raise ValueError(
            f"unknown semantic_type: message {k} has semantic_type {stype!r} (known: {', '.join(types.names)})"
        )
    _unused_keys(msg, MESSAGE_KEYS, ignore, f"message {k}")
    return {"role": role, "content": content, "semantic_type": stype}


def _check_path(raw_path: str | Path) -> Path:
    """The path of a readable data file, or a one-line error saying what is wrong with it."""
    path = Path(raw_path)
    if path.is_dir():
        raise ValueError(
            f"data file is a directory: {path}; give the data files themselves "
            "(e.g. data.train_files=[dir/a.jsonl,dir/b.jsonl]): directories are not read"
        )
    if not path.is_file():
        hint = "; wildcards are not expanded: list the files" if any(c in str(path) for c in "*?[") else ""
        raise FileNotFoundError(f"data file not found: {path} (check data.train_files / data.eval_files{hint})")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .json or .jsonl")
    return path


def _read(path: Path) -> bytes:
    """The file's bytes, without a UTF-8 byte-order mark."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            str(path), 1, "not UTF-8 text: the file is UTF-16 (it starts with a UTF-16 mark); save as UTF-8"
        )
    return data.removeprefix(codecs.BOM_UTF8)


def _to_record(
    path: Path,
    lineno: int,
    obj: Any,
    types: SemanticTypes,
    ignore: frozenset[str],
    check: Callable[[Record], None] | None,
) -> Record:
    """The checked record, or DataError naming its file and line."""
    if isinstance(obj, DataError):
        raise obj
    try:
        record = Record(check_messages(obj, types, ignore), str(path), lineno)
        if check is not None:
            check(record)
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(str(path), lineno, str(exc)) from None
    return record


def load_records(
    paths: list[str | Path],
    types: SemanticTypes,
    on_error: str = "raise",
    check: Callable[[Record], None] | None = None,
    ignore_keys: Iterable[str] = ("id",),
) -> tuple[list[Record], LoadReport]:
    """All valid records of `paths`, in file order. `check` may add a per-record test (e.g. tokenization).

    on_error="raise" stops at the first bad record with `file:line: problem`; "skip" skips and counts it.
    `ignore_keys`: record or message keys that are pure metadata; any other key the run does not use is an error.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={on_error!r}: use 'raise' or 'skip'")
    if not paths:
        raise ValueError("no data files given: set data.train_files=[path/to/file.jsonl]")
    ignore = _ignore_set(ignore_keys)
    files = [_check_path(p) for p in paths]  # every path is checked before the first (maybe long) file is read
    records: list[Record] = []
    report = LoadReport()
    for path in files:
        walker = _iter_jsonl if path.suffix.lower() == ".jsonl" else _iter_json_array
        for lineno, obj in walker(path, _read(path)):
            try:
                records.append(_to_record(path, lineno, obj, types, ignore, check))
            except DataError as err:
                if on_error == "raise":
                    raise
                report.skipped.append(err)
    report.kept = len(records)
    if not records:
        raise ValueError(
            f"no usable records in {', '.join(map(str, paths))}" + (f" ({report.summary()})" if report.skipped else "")
        )
    return records, report
