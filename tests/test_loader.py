"""The loader on good files, on every kind of bad record (file:line: problem), and on real third-party files."""

import json

import pytest
from conftest import ROOT

from hsa_train.data import DataError, SemanticTokenizer
from hsa_train.data.dataset import encode_files, split_ids
from hsa_train.data.loader import LoadReport, iter_records, load_records
from hsa_train.data.spec import resolve_datasets
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
    untyped = records[0].messages[1]  # untyped: the run's default type, and the rule that says so
    assert (untyped["semantic_type"], untyped["type_rule"]) == (TYPES.default, "default")
    assert records[0].messages[0]["type_rule"] == "explicit"


BAD = [
    ("{not json", "malformed JSON"),
    ({"conversations": []}, "no 'messages' key"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "non-string content"),
    ({"messages": [{"role": "user", "content": "x", "semantic_type": "URGENT"}]}, "unknown semantic_type"),
    ({"messages": [{"role": "user", "content": "a question only"}]}, "nothing to train on"),
    ({**GOOD, "images": ["a.jpg"]}, "placeholder count: the messages hold 0 <image> placeholders"),
    (
        {"messages": [GOOD["messages"][0], {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{x"}]}]},
        "tool call not JSON: message 1 call 0 (f) has arguments that are not JSON",
    ),
    ('{"messages": [{"role": "user", "content": "a", "content": "b"}]}', "duplicate key: 'content'"),
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
    (kept1, held1), (_, held2) = split_ids(len(samples), 0.1, seed=3), split_ids(len(samples), 0.1, seed=3)
    tr1, ev1, ev2 = ([samples[i] for i in ids] for ids in (kept1, held1, held2))
    assert [s.where for s in ev1] == [s.where for s in ev2] and len(ev1) == 4 and len(tr1) == 36
    assert not {s.where for s in ev1} & {s.where for s in tr1}


def test_peer_image_file_in_a_text_only_run_fails_clearly(peer_data, tokenizer):
    """mllm_demo.json's images cannot be seen by a text model: refused with file and line, or skipped and counted;
    never trained as the text "<image>"."""
    path = peer_data / "mllm_demo.json"
    with pytest.raises(DataError, match=r"mllm_demo.json:2: image in a text-only model: message 0 holds images"):
        encode_files([path], SemanticTokenizer(tokenizer))
    with pytest.raises(ValueError, match="no usable records .*image in a text-only model"):
        encode_files([path], SemanticTokenizer(tokenizer), on_error="skip")


@pytest.mark.parametrize(
    "name, line, problem",
    [
        (
            "glaive_toolcall_en_demo.json",
            2,
            "malformed record: no 'messages' key .* looks like ShareGPT.*format: sharegpt",
        ),
        ("identity.json", 2, "malformed record: no 'messages' key .* looks like alpaca.*format: alpaca"),
    ],
)
def test_peer_files_in_other_formats_fail_clearly(peer_data, tokenizer, name, line, problem):
    with pytest.raises(DataError, match=rf"{name}:{line}: {problem}"):
        encode_files([peer_data / name], SemanticTokenizer(tokenizer))
    with pytest.raises(ValueError, match="no usable records"):
        encode_files([peer_data / name], SemanticTokenizer(tokenizer), on_error="skip")


@pytest.mark.parametrize(
    "extra, hint",
    [
        ({"audios": ["a.wav"]}, "audio data is not supported yet"),
        ({"chosen": "a better answer"}, "preference pairs: set ranking: true on the dataset entry"),
        ({"system": "Be brief."}, "role 'system'"),
        ({"loss_weight": 0.5}, "loss weights are not supported"),
        ({"source": "web"}, "data.ignore_keys"),
    ],
)
def test_unused_record_key_is_an_error_naming_it(tmp_path, extra, hint):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, **extra}])
    key = next(iter(extra))
    with pytest.raises(DataError, match=rf"a.jsonl:2: unused key: the record has '{key}', not used by training"):
        load_records([path], TYPES)
    with pytest.raises(DataError) as info:
        load_records([path], TYPES)
    assert hint in str(info.value) and "\n" not in str(info.value)
    records, report = load_records([path], TYPES, on_error="skip")
    assert len(records) == 1 and [e.line for e in report.skipped] == [2]
    assert "1x unused key" in report.summary()


@pytest.mark.parametrize(
    "extra, hint",
    [
        ({"function_call": {"name": "f", "arguments": "{}"}}, "old-style function_call is not read"),
        ({"name": "bob"}, "names are not rendered"),
        ({"tool_call_id": "call_1"}, "tool call ids are not rendered"),
        ({"weight": 0.0}, "loss weights are not supported"),
        ({"loss": False}, "loss weights are not supported"),
    ],
)
def test_unused_message_key_is_an_error_naming_it(tmp_path, extra, hint):
    row = {"messages": [GOOD["messages"][0], {**GOOD["messages"][1], **extra}]}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    key = next(iter(extra))
    with pytest.raises(DataError, match=rf"a.jsonl:1: unused key: message 1 has '{key}', not used by training"):
        load_records([path], TYPES)
    with pytest.raises(DataError) as info:
        load_records([path], TYPES)
    assert hint in str(info.value)


def test_ignore_keys_declares_metadata_and_none_values_carry_nothing(tmp_path):
    tagged = {"id": 7, "source": "web", "images": None, "messages": [{**m, "note": "x"} for m in GOOD["messages"]]}
    path = write_jsonl(tmp_path / "a.jsonl", [tagged])
    with pytest.raises(DataError, match="unused key: the record has 'source'"):
        load_records([path], TYPES)  # 'id' is ignored by default, 'images': null carries no data
    with pytest.raises(DataError, match="unused key: message 0 has 'note'"):
        load_records([path], TYPES, ignore_keys=("id", "source"))
    records, _ = load_records([path], TYPES, ignore_keys=("id", "source", "note"))
    plain = [{k: m[k] for k in ("role", "content")} for m in records[0].messages]
    assert plain == [{k: m[k] for k in ("role", "content")} for m in GOOD["messages"]]
    assert [m["semantic_type"] for m in records[0].messages] == ["GLOBAL_CONDITION", TYPES.default]
    with pytest.raises(DataError, match="unused key: the record has 'id'"):
        load_records([path], TYPES, ignore_keys=("source", "note"))
    with pytest.raises(ValueError, match="ignore_keys"):
        load_records([path], TYPES, ignore_keys="id")


def test_bundled_data_has_no_unused_keys():
    pairs = ROOT / "data" / "demo" / "preferences.jsonl"  # preference pairs: read as conf/data/dpo_demo.yaml does
    labelled = ROOT / "data" / "demo" / "labelled.jsonl"  # labelled samples: as conf/data/kto_demo.yaml reads them
    files = [f for f in sorted((ROOT / "data").glob("*/*.jsonl")) if f not in (pairs, labelled)]
    assert len(files) >= 5
    records, report = load_records(files, TYPES, ignore_keys=("id", "episode"))  # conf/data/agent_demo.yaml's
    assert not report.skipped and len(records) == report.kept
    pair_report = LoadReport()
    [spec] = resolve_datasets([{"path": str(pairs), "ranking": True}], None, TYPES)
    kept = list(iter_records(spec, TYPES, "raise", pair_report, ignore_keys=("id", "kind")))
    assert len(kept) == pair_report.kept == 600 and all(r.is_pair for r in kept)
    label_report = LoadReport()
    [spec] = resolve_datasets([{"path": str(labelled), "columns": {"kto_tag": "label"}}], None, TYPES)
    kept = list(iter_records(spec, TYPES, "raise", label_report, ignore_keys=("id", "kind")))
    assert len(kept) == label_report.kept == 600 and all(r.is_labelled for r in kept)
    assert {r.desirable for r in kept} == {True, False}
