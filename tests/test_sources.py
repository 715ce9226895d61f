"""Dataset sources (parquet, folders, save_to_disk folders, load_dataset names) and resolve_datasets' checks."""

import json
import re

import pytest

from hsa_train.data import sources
from hsa_train.data.loader import DataError, LoadReport, iter_records
from hsa_train.data.spec import resolve_datasets
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()
GOOD = {"messages": [{"role": "user", "content": "Task: x"}, {"role": "assistant", "content": "ok"}]}


def load(path, **entry):
    (spec,) = resolve_datasets([{"path": str(path), **entry}], types=TYPES)
    return list(iter_records(spec, TYPES))


def content(records):
    return [(r.messages, r.tools) for r in records]


@pytest.fixture(scope="module")
def glaive_rows(peer_data):
    return json.loads((peer_data / "glaive_toolcall_en_demo.json").read_text())[:40]


def test_parquet_and_saved_datasets_load_like_json(tmp_path, peer_data, glaive_rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    as_json = load(peer_data / "glaive_toolcall_en_demo.json", format="sharegpt", max_samples=40)
    pq.write_table(pa.Table.from_pylist(glaive_rows), tmp_path / "g.parquet", row_group_size=7)
    from_parquet = load(tmp_path / "g.parquet", format="sharegpt")
    assert content(from_parquet) == content(as_json)
    assert [r.line for r in from_parquet] == list(range(1, 41)) and from_parquet[0].source == str(
        tmp_path / "g.parquet"
    )

    ds = datasets.Dataset.from_list(glaive_rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert content(load(tmp_path / "saved", format="sharegpt")) == content(as_json)
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    records = load(tmp_path / "dict", format="sharegpt", split="test")
    assert content(records) == content(as_json) and records[0].where == f"{tmp_path / 'dict'}[test]:1"
    assert len(load(tmp_path / "dict", format="sharegpt")) == 3  # split defaults to train
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: train, test\)"):
        load(tmp_path / "dict", format="sharegpt", split="validation")


def test_parts_with_spans_survive_parquet(tmp_path):
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "semantic_type": "KEY_EVENT"}],
            },
            {"role": "assistant", "content": [{"type": "text", "value": "c"}]},
        ]
    }
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([row]))
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "a.parquet")
    assert content(load(tmp_path / "a.parquet")) == content(load(tmp_path / "a.json"))
    assert load(tmp_path / "a.parquet")[0].messages[0]["spans"] == [(1, 2, "KEY_EVENT")]


def test_folder_reads_its_data_files_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (folder / "a.json").write_text(json.dumps([GOOD]))
    pq.write_table(pa.Table.from_pylist([GOOD]), folder / "c.parquet")
    (folder / ".hidden").write_text("x")
    records = load(folder)
    assert [r.where for r in records] == [
        f"{folder}/a.json:1",
        f"{folder}/b.jsonl:1",
        f"{folder}/b.jsonl:2",
        f"{folder}/c.parquet:1",
    ]
    (folder / "README.md").write_text("x")
    with pytest.raises(ValueError, match=r"data folder .*: holds README.md, which are not data files"):
        load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"data folder .*empty: no .json, .jsonl or .parquet files"):
        load(empty)


def test_records_stream(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n")
    (spec,) = resolve_datasets([str(path)], types=TYPES)
    it = iter_records(spec, TYPES)
    assert next(it).line == 1  # the bad second line is not read yet
    with pytest.raises(DataError, match=r"a.jsonl:2: malformed JSON"):
        next(it)


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([GOOD, GOOD])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    records = load("someone/episodes", subset="en", split="validation")
    assert calls == [("someone/episodes", "en", "validation")]
    assert [r.where for r in records] == ["someone/episodes[validation]:1", "someone/episodes[validation]:2"]


def test_hub_name_that_cannot_load_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/episodes' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError) as info:
        load("someone/episodes")
    message = str(info.value)
    assert "\n" not in message and message.startswith("dataset 'someone/episodes': not a local path, and ")
    assert "could not load it (ConnectionError: Couldn't reach" in message


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    (spec,) = resolve_datasets([str(tmp_path / "nope.jsonl")], types=TYPES)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        iter_records(spec, TYPES)  # at the call, before the first record is asked for
    assert sources.looks_local("./x") and not sources.looks_local("org/name")


RESOLVE_ERRORS = [
    ([{"path": "a.jsonl", "colums": {}}], "data.datasets[0] (a): unknown key 'colums' (did you mean 'columns'?)"),
    (["a.jsonl", {"path": "b.jsonl", "format": "openai"}], "data.datasets[1] (b): unknown format 'openai'"),
    ([{"path": "a.jsonl", "weight": 0}], "data.datasets[0] (a): weight=0: give a number > 0"),
    ([{"path": "a.jsonl", "weight": True}], "weight=True: give a number > 0"),
    ([{"path": "a.jsonl", "max_samples": 2.5}], "max_samples=2.5: give an integer > 0"),
    (
        [{"path": "a.jsonl", "name": "g", "semantic_type_rules": [{"pattern": "^Task:(", "type": "KEY_EVENT"}]}],
        "data.datasets[0] (g): semantic_type_rules[0]: pattern '^Task:(' does not compile (missing ), unterminated",
    ),
    (
        [{"path": "a.jsonl", "semantic_type_rules": [{"pattern": "x", "type": "HOT"}]}],
        "semantic_type_rules[0]: unknown semantic type 'HOT' (known: GLOBAL_CONDITION, KEY_EVENT, PROCESS_NOISE)",
    ),
    (
        [{"path": "a.jsonl", "semantic_type_rules": [{"pattern": "x", "type": "KEY_EVENT", "role": "human"}]}],
        "semantic_type_rules[0]: unknown role 'human' (known: system, user, assistant, tool)",
    ),
    (
        [{"path": "a.jsonl", "semantic_type_by_role": {"system": "GLOBAL"}}],
        "semantic_type_by_role.system: unknown semantic type 'GLOBAL'",
    ),
    ([{"path": "a.jsonl", "default_semantic_type": "NOISE"}], "default_semantic_type: unknown semantic type 'NOISE'"),
    ([{"path": "a.jsonl", "columns": {"chosen": "c"}}], "columns chosen: preference pairs need ranking: true"),
    ([{"path": "a.jsonl", "ranking": "yes"}], "ranking='yes': give true or false"),
    (
        [{"path": "a.jsonl", "format": "alpaca", "ranking": True, "columns": {"response": "out"}}],
        "columns.response: a ranking alpaca dataset reads its two responses from chosen / rejected",
    ),
    ([{"path": "a.jsonl", "columns": {"prompt": "q"}}], "columns prompt do not apply to format 'messages'"),
    ([{"path": "a.jsonl", "format": "alpaca", "tags": {"role_tag": "r"}}], "tags do not apply to format 'alpaca'"),
    ([{"path": "a.jsonl", "format": "sharegpt", "tags": {"user_tag": "gpt"}}], "two roles share one tag"),
    ([{"format": "alpaca"}], "data.datasets[0]: no path"),
]


@pytest.mark.parametrize("entries, problem", RESOLVE_ERRORS)
def test_resolve_errors_name_the_entry(entries, problem):
    with pytest.raises(ValueError) as info:
        resolve_datasets(entries, types=TYPES)
    assert problem in str(info.value) and "\n" not in str(info.value)


INFO_ERRORS = [
    ("glaive_tolcall_en_demo", "data.datasets[0] (glaive_tolcall_en_demo): no entry 'glaive_tolcall_en_demo' in "),
    ("starcoder_python", "dataset_info key 'folder' is not supported (supported: file_name, hf_hub_url"),
]


@pytest.mark.parametrize("name, problem", INFO_ERRORS)
def test_dataset_info_errors(peer_data, name, problem):
    with pytest.raises(ValueError) as info:
        resolve_datasets([name], dataset_info=str(peer_data / "dataset_info.json"), types=TYPES)
    assert problem in str(info.value)
    if "no entry" in problem:
        assert "glaive_toolcall_en_demo" in str(info.value)  # the close match is listed


def test_dataset_info_mirror_only_and_custom_types(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(
        json.dumps(
            {"ms": {"ms_hub_url": "x/y"}, "mine": {"file_name": "m.jsonl", "num_samples": 5, "formatting": "sharegpt"}}
        )
    )
    with pytest.raises(ValueError, match=re.escape("data.datasets[0] (ms): dataset_info a source in ['ms_hub_url']")):
        resolve_datasets(["ms"], dataset_info=str(info))
    (spec,) = resolve_datasets(["mine"], dataset_info=str(info))
    assert (spec.path, spec.max_samples, spec.format) == (str(tmp_path / "m.jsonl"), 5, "sharegpt")
    types = SemanticTypes(("TASK", "NOISE"), "NOISE")
    (spec,) = resolve_datasets([{"path": "a.jsonl", "semantic_type_by_role": {"system": "TASK"}}], types=types)
    assert spec.semantic_type_by_role == {"system": "TASK"}
    with pytest.raises(FileNotFoundError, match="data.dataset_info=.*: file not found"):
        resolve_datasets(["x"], dataset_info=str(tmp_path / "none.json"))


def test_skip_report_counts_structural_problems_by_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{bad\n" + json.dumps(GOOD) + "\n")
    (spec,) = resolve_datasets([str(path)], types=TYPES)
    report = LoadReport()
    records = list(iter_records(spec, TYPES, "skip", report))
    assert len(records) == 2 and [(e.source, e.line) for e in report.skipped] == [(str(path), 2)]
    assert "1x malformed JSON" in report.summary()
