"""Raw records of one dataset source, each with where it came from: `(source, line, record)`, streamed.

- `.json` / `.jsonl` files: walked without building the whole list, every record with its line (duplicate keys,
  invalid UTF-8, a BOM, UTF-16, a JSON array named .jsonl and trailing data are all reported where they are).
- `.parquet` files (pyarrow, read batch by batch): the "line" is the 1-based row number.
- folders: every `.json` / `.jsonl` / `.parquet` file in it, sorted by name; a folder written by
  `datasets.Dataset.save_to_disk` (`state.json`) or `DatasetDict.save_to_disk` (`dataset_dict.json`, pick `split`)
  is read with `datasets.load_from_disk` (memory-mapped Arrow).
- anything else that is not an existing path: `datasets.load_dataset(path, subset, split=split)` (hub ids).

A record that cannot be read is yielded as a `DataError` in place of the record, so `on_error=skip` can skip it; a
problem the walk cannot step over (a syntax error inside a JSON array) is raised.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hsa_train.types import one_line

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
_BATCH = 1024


class DataError(ValueError):
    """A problem with one record, located by file and line."""

    def __init__(self, source: str, line: int, problem: str):
        self.source, self.line, self.problem = source, line, problem
        super().__init__(f"{source}:{line}: {problem}")

    def __reduce__(self):  # travels back from worker processes whole
        return (type(self), (self.source, self.line, self.problem))


Row = tuple[str, int, Any]  # (source, line, record or DataError)


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


_UTF16 = "not UTF-8 text: the file is UTF-16 (it starts with a UTF-16 mark); save as UTF-8"


def _not_utf8(exc: UnicodeDecodeError) -> str:
    column = exc.start - exc.object.rfind(b"\n", 0, exc.start)
    return f"not UTF-8 text: invalid byte 0x{exc.object[exc.start]:02x} at byte {column} of the line"


def iter_jsonl(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    """One record per line (`lines`: the file's lines, split on b"\\n" only: str.splitlines() also splits on
    U+2028, U+0085, ... which JSON allows inside strings). A line that is not UTF-8 or not JSON is one bad record (so
    `skip` can skip it); a JSON array in a .jsonl file is an error with a hint."""
    dups = _DuplicateKeys()
    decoder = json.JSONDecoder(object_pairs_hook=dups)
    first = True
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1:
            if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise DataError(str(path), 1, _UTF16)
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        if first and raw.lstrip().startswith(b"["):
            problem = "not JSON Lines: the file looks like a JSON array (it starts with '['); rename it to .json"
            raise DataError(str(path), lineno, problem + ", or write one JSON object per line")
        first = False
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


def iter_json_array(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
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


def read_bytes(path: Path) -> bytes:
    """The file's bytes, without a UTF-8 byte-order mark."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(str(path), 1, _UTF16)
    return data.removeprefix(codecs.BOM_UTF8)


def check_file(raw_path: str | Path) -> Path:
    """The path of a readable data file, or a one-line error saying what is wrong with it (data.train_files reads
    files only; a dataset entry in data.datasets may also name a folder)."""
    path = Path(raw_path)
    if path.is_dir():
        raise ValueError(
            f"data file is a directory: {path}; give the data files themselves "
            "(e.g. data.train_files=[dir/a.jsonl,dir/b.jsonl]), or name the folder in data.datasets"
        )
    if not path.is_file():
        hint = "; wildcards are not expanded: list the files" if any(c in str(path) for c in "*?[") else ""
        raise FileNotFoundError(f"data file not found: {path} (check data.train_files / data.eval_files{hint})")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl or .parquet")
    return path


def iter_file(path: Path) -> Iterator[Row]:
    """The records of one .json / .jsonl / .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    source = str(path)
    if suffix == ".jsonl":
        with path.open("rb") as lines:  # line by line: a big file is never held whole
            for line, obj in iter_jsonl(path, lines):
                yield source, line, obj
        return
    for line, obj in iter_json_array(path, read_bytes(path)):
        yield source, line, obj


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with multi-line text
        raise DataError(str(path), 1, f"unreadable parquet file: {one_line(exc, 'first', typed=True)}") from None
    row = 0
    for batch in reader.iter_batches(batch_size=_BATCH):
        for obj in batch.to_pylist():
            row += 1
            yield str(path), row, obj


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (a LLaMA-Factory data folder also
    holds a `dataset_info.json`, so that file alone says nothing)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def folder_files(folder: Path) -> list[Path]:
    """The data files of a plain folder, sorted; an empty folder or one with other files is an error."""
    files, others = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        (files if entry.is_file() and entry.suffix.lower() in DATA_SUFFIXES else others).append(entry.name)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(
            f"data folder {folder}: holds {shown}, which are not data files (.json, .jsonl, .parquet); "
            "move them out, or list the data files in the dataset entries"
        )
    if not files:
        raise ValueError(f"data folder {folder}: no .json, .jsonl or .parquet files in it")
    return [folder / name for name in files]


def _iter_hf(ds: Any, source: str) -> Iterator[Row]:
    """Rows of a `datasets.Dataset` in batches (memory-mapped Arrow: nothing is collected)."""
    row = 0
    for start in range(0, len(ds), _BATCH):
        batch = ds[start : start + _BATCH]
        for values in zip(*batch.values()):
            row += 1
            yield source, row, dict(zip(batch.keys(), values))


def _iter_saved(folder: Path, split: str | None) -> Iterator[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    source = str(folder)
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise ValueError(
                f"saved dataset {folder}: no split {split!r} (splits: {', '.join(loaded)}); set the entry's split"
            )
        loaded, source = loaded[split], f"{folder}[{split}]"
    yield from _iter_hf(loaded, source)


def looks_local(path: str) -> bool:
    """A path that names a local file, not a hub id: absolute, ./-relative, or with a data file suffix."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix.lower() in DATA_SUFFIXES


def _iter_hub(path: str, subset: str | None, split: str | None) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, split=split or "train")
    except Exception as exc:  # offline, unknown id, bad config: one line naming the dataset
        raise ValueError(
            f"dataset {path!r}: not a local path, and datasets.load_dataset({path!r}"
            + (f", {subset!r}" if subset else "")
            + f", split={split or 'train'!r}) could not load it ({one_line(exc, 'first', typed=True)})"
        ) from None
    if isinstance(ds, datasets.IterableDataset):  # (not with split=...; kept for safety)
        for row, obj in enumerate(ds, start=1):
            yield path, row, obj
        return
    source = f"{path}[{split or 'train'}]"
    yield from _iter_hf(ds, source)


def iter_source(path: str | Path, split: str | None = None, subset: str | None = None) -> Iterator[Row]:
    """`(source, line, record)` of every record of one dataset path, streamed (see the module docstring)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if is_saved_dataset(local):
            yield from _iter_saved(local, split)
            return
        for file in folder_files(local):
            yield from iter_file(file)
        return
    if local.is_file() or looks_local(str(path)):
        yield from iter_file(check_file(local))
        return
    yield from _iter_hub(str(path), subset, split)
