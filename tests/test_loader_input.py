"""The loader on awkward input: huge lines, duplicate keys, bad bytes, a BOM, an array named .jsonl, a directory."""

import codecs
import json

import pytest

from hsa_train.data import DataError, SemanticTokenizer
from hsa_train.data.dataset import encode_files
from hsa_train.data.loader import load_records
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()
GOOD = {"messages": [{"role": "user", "content": "Task: x"}, {"role": "assistant", "content": "ok"}]}
LINE = json.dumps(GOOD)


def test_huge_record_is_rejected_by_characters_before_it_is_tokenized(tmp_path, tokenizer):
    huge = {"messages": [{"role": "user", "content": "x" * 4_000_000}, {"role": "assistant", "content": "ok"}]}
    long = {"messages": [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([LINE, json.dumps(huge), json.dumps(long), LINE]) + "\n")
    st = SemanticTokenizer(tokenizer, max_length=64)
    encoded, real_encode = [], st.encode_detailed

    def counting_encode(messages, tools=None):
        encoded.append(sum(len(m["content"]) for m in messages))
        return real_encode(messages, tools)

    st.encode_detailed = counting_encode
    with pytest.raises(DataError, match=r"a.jsonl:2: too long: 4000002 characters > \d+ .*data.cutoff_len=64"):
        encode_files([path], st)
    assert max(encoded) < 1000  # the huge record never reached the tokenizer
    samples, report = encode_files([path], st, on_error="skip")
    assert len(samples) == 2 and [e.line for e in report.skipped] == [2, 3]
    assert "2x too long" in report.summary()  # by characters and by tokens: one reason
    assert max(encoded) < 1000


def test_no_character_bound_without_max_length(tmp_path, tokenizer):
    row = {"messages": [{"role": "user", "content": "x " * 20_000}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(row) + "\n")
    samples, _ = encode_files([path], SemanticTokenizer(tokenizer))
    assert len(samples) == 1


def test_duplicate_keys_are_errors_in_jsonl_and_json(tmp_path):
    dup = '{"messages": [{"role": "user", "content": "a", "role": "assistant"}]}'
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join([LINE, dup, LINE]) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl:2: duplicate key: 'role' appears twice in one object"):
        load_records([jl], TYPES)
    records, report = load_records([jl], TYPES, on_error="skip")
    assert [r.line for r in records] == [1, 3] and [e.line for e in report.skipped] == [2]

    arr = tmp_path / "b.json"
    dup = '{"messages": [], \n "messages": ' + json.dumps(GOOD["messages"]) + "}"
    arr.write_text("[\n" + LINE + ",\n" + dup + ",\n" + LINE + "\n]")
    with pytest.raises(DataError, match=r"b.json:3: duplicate key: 'messages'"):
        load_records([arr], TYPES)
    records, report = load_records([arr], TYPES, on_error="skip")
    assert [r.line for r in records] == [2, 5] and [e.line for e in report.skipped] == [3]

    single = tmp_path / "c.json"
    single.write_text('{"messages": [], "messages": []}')
    with pytest.raises(DataError, match=r"c.json:1: duplicate key: 'messages'"):
        load_records([single], TYPES)


def test_invalid_utf8_is_reported_at_its_line_and_can_be_skipped(tmp_path):
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    jl = tmp_path / "a.jsonl"
    jl.write_bytes(b"\n".join([LINE.encode(), LINE.encode(), bad, LINE.encode()]) + b"\n")
    column = bad.index(b"\xe9") + 1
    with pytest.raises(DataError, match=rf"a.jsonl:3: not UTF-8 text: invalid byte 0xe9 at byte {column} of the line"):
        load_records([jl], TYPES)
    records, report = load_records([jl], TYPES, on_error="skip")
    assert [r.line for r in records] == [1, 2, 4] and [e.line for e in report.skipped] == [3]

    arr = tmp_path / "b.json"
    arr.write_bytes(b"[\n" + LINE.encode() + b",\n" + bad + b"\n]")
    with pytest.raises(DataError, match=r"b.json:3: not UTF-8 text: invalid byte 0xe9"):
        load_records([arr], TYPES, on_error="skip")  # a .json cannot be split around bad bytes: stop


def test_utf16_file_says_so(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(codecs.BOM_UTF16_LE + (LINE + "\n").encode("utf-16-le"))
    with pytest.raises(DataError, match=r"a.jsonl:1: not UTF-8 text: .*UTF-16"):
        load_records([path], TYPES, on_error="skip")


@pytest.mark.parametrize("text", [json.dumps([GOOD, GOOD]), "\n[\n" + LINE + ",\n" + LINE + "\n]\n"])
def test_json_array_in_jsonl_gets_a_hint_not_a_line_count(tmp_path, text):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    line = 2 if text.startswith("\n") else 1
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=rf"a.jsonl:{line}: not JSON Lines: .*JSON array.*rename it to .json"):
            load_records([path], TYPES, on_error=on_error)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf8_bom_is_accepted(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    body = "[" + LINE + ",\n" + LINE + "]" if suffix == ".json" else LINE + "\n" + LINE + "\n"
    path.write_bytes(codecs.BOM_UTF8 + body.encode())
    records, report = load_records([path], TYPES)
    assert [r.line for r in records] == [1, 2] and not report.skipped


def test_line_separator_inside_a_string_does_not_split_a_jsonl_line(tmp_path):
    row = {"messages": [{"role": "user", "content": "a\u2028b\x85c"}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + LINE + "\n", encoding="utf-8")
    records, _ = load_records([path], TYPES)
    assert [r.line for r in records] == [1, 2] and records[0].messages[0]["content"] == "a\u2028b\x85c"


def test_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "a.jsonl").write_text(LINE + "\n")
    with pytest.raises(ValueError, match=r"is a directory.*give the data files themselves") as info:
        load_records([tmp_path], TYPES)
    assert "not found" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"not found.*wildcards are not expanded"):
        load_records([tmp_path / "*.jsonl"], TYPES)
