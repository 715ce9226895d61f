"""The loader on good files, on every kind of bad record (file:line: problem), and on real third-party files."""

import json

import pytest

from hsa_train.data import DataError, SemanticTokenizer
from hsa_train.data.dataset import encode_files, split_eval
from hsa_train.data.loader import load_records
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()
GOOD = {
    "messages": [
        {"role": "user", "content": "Task: x", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "assistant", "content": "ok"},
    ]
}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_and_json_array_load_with_lines(tmp_path):
    jl = write_jsonl(tmp_path / "a.jsonl", [GOOD, "", GOOD])
    records, report = load_records([jl], TYPES)
    assert [r.line for r in records] == [1, 3] and report.kept == 2
    arr = tmp_path / "b.json"
    arr.write_text("[\n" + json.dumps(GOOD) + ",\n\n" + json.dumps(GOOD, indent=1) + "\n]\n")
    records, _ = load_records([arr], TYPES)
    assert [r.line for r in records] == [2, 4]
    assert records[0].messages[1]["semantic_type"] is None  # untyped: the tokenizer gives it the default


BAD = [
    ("{not json", "malformed JSON"),
    ({"conversations": []}, "no 'messages' key"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "non-string content"),
    ({"messages": [{"role": "user", "content": "x", "semantic_type": "URGENT"}]}, "unknown semantic_type"),
    ({"messages": [{"role": "user", "content": "a question only"}]}, "nothing to train on"),
]


@pytest.mark.parametrize("row, problem", BAD)
def test_bad_record_names_file_line_and_problem(tmp_path, tokenizer, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        encode_files([path], SemanticTokenizer(tokenizer))
    assert str(info.value).startswith(f"{path}:3: ")
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_skip_counts_every_bad_record(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD] + [row for row, _ in BAD] + [GOOD])
    samples, report = encode_files([path], SemanticTokenizer(tokenizer), on_error="skip")
    assert len(samples) == 2 and report.kept == 2
    assert len(report.skipped) == len(BAD)
    assert sorted(e.line for e in report.skipped) == list(range(2, 2 + len(BAD)))
    assert f"{len(BAD)} skipped" in report.summary()


def test_json_array_syntax_error_reports_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(GOOD) + ',\n{"messages": [}\n]')
    with pytest.raises(DataError, match=r"broken.json:3: malformed JSON"):
        load_records([path], TYPES, on_error="skip")


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records([tmp_path / "nope.jsonl"], TYPES)
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_records([other], TYPES)


def test_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 40)
    samples, _ = encode_files([path], SemanticTokenizer(tokenizer))
    tr1, ev1 = split_eval(samples, 0.1, seed=3)
    tr2, ev2 = split_eval(samples, 0.1, seed=3)
    assert [s.where for s in ev1] == [s.where for s in ev2] and len(ev1) == 4 and len(tr1) == 36
    assert not {s.where for s in ev1} & {s.where for s in tr1}


def test_peer_messages_file_loads_with_default_types(peer_data, tokenizer):
    samples, report = encode_files([peer_data / "mllm_demo.json"], SemanticTokenizer(tokenizer))
    assert report.kept == len(json.loads((peer_data / "mllm_demo.json").read_text())) and not report.skipped
    assert all(set(s.features["semantic_ids"]) == {TYPES.default_id} for s in samples)


@pytest.mark.parametrize(
    "name, line, problem",
    [
        ("glaive_toolcall_en_demo.json", 2, "malformed record: no 'messages' key .* looks like ShareGPT"),
        ("identity.json", 2, "malformed record: no 'messages' key .* looks like alpaca"),
        ("v1_sft_demo.jsonl", 1, "non-string content"),  # content as a list of parts
    ],
)
def test_peer_files_in_other_formats_fail_clearly(peer_data, tokenizer, name, line, problem):
    with pytest.raises(DataError, match=rf"{name}:{line}: {problem}"):
        encode_files([peer_data / name], SemanticTokenizer(tokenizer))
    with pytest.raises(ValueError, match="no usable records"):
        encode_files([peer_data / name], SemanticTokenizer(tokenizer), on_error="skip")
