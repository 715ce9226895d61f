"""Dataset formats (messages, sharegpt, alpaca) on the LLaMA-Factory peer files and on every kind of bad record."""

import json
from pathlib import Path

import pytest

from hsa_train.data.loader import DataError, LoadReport, iter_records
from hsa_train.data.spec import DatasetSpec, resolve_datasets
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()


def spec_of(path, **entry):
    return resolve_datasets([{"path": str(path), **entry}], types=TYPES)[0]


def load(path, on_error="raise", ignore_keys=("id",), **entry):
    report = LoadReport()
    records = list(iter_records(spec_of(path, **entry), TYPES, on_error, report, ignore_keys))
    return records, report


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def plain(messages):
    """role, content and tool calls only (what the template sees)."""
    return [{k: m[k] for k in ("role", "content", "tool_calls") if k in m} for m in messages]


def test_alpaca_identity(peer_data):
    raw = json.loads((peer_data / "identity.json").read_text())
    records, report = load(peer_data / "identity.json", format="alpaca")
    assert len(records) == len(raw) == 91 and report.kept == 91 and not report.skipped
    for record, row in zip(records, raw):
        assert plain(record.messages) == [
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["output"]},
        ]
        assert record.tools is None and record.source.endswith("identity.json")
    assert records[0].line == 2 and records[1].line == 7  # the line each array element starts on


@pytest.mark.parametrize("name", ["glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json"])
def test_sharegpt_glaive_toolcalls(peer_data, name):
    raw = json.loads((peer_data / name).read_text())
    records, report = load(peer_data / name, format="sharegpt")
    assert len(records) == len(raw) == 300 and not report.skipped
    n_calls = n_obs = 0
    for record, row in zip(records, raw):
        assert len(record.messages) == len(row["conversations"])
        for msg, turn in zip(record.messages, row["conversations"]):
            if turn["from"] == "function_call":
                n_calls += 1
                call = json.loads(turn["value"])
                assert msg["role"] == "assistant" and msg["content"] == ""
                assert msg["tool_calls"] == [
                    {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
                ]
                assert isinstance(msg["tool_calls"][0]["function"]["arguments"], dict)
            elif turn["from"] == "observation":
                n_obs += 1
                assert msg == {**msg, "role": "tool", "content": turn["value"]} and "tool_calls" not in msg
            else:
                expected = {"human": "user", "gpt": "assistant"}[turn["from"]]
                assert msg["role"] == expected and msg["content"] == turn["value"] and "tool_calls" not in msg
        tools = json.loads(row["tools"])
        assert record.tools == (tools or None)
        assert record.tools is None or all(isinstance(t, dict) and "name" in t for t in record.tools)
    assert n_calls > 200 and n_obs > 200
    assert sum(r.tools is not None for r in records) >= 190


def test_v1_parts_and_loss_weights(peer_data):
    path = peer_data / "v1_sft_demo.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    records, report = load(path)
    assert len(records) == len(raw) == 500 and not report.skipped
    for record, row in zip(records, raw):
        texts = ["".join(p["value"] for p in m["content"]) for m in row["messages"]]
        assert [m["content"] for m in record.messages] == texts
        assert [m["role"] for m in record.messages] == [m["role"] for m in row["messages"]]
        assert all("spans" not in m for m in record.messages)
    assert [r.line for r in records[:3]] == [1, 2, 3]


def test_mllm_demo_images_go_to_the_messages_that_hold_their_placeholders(peer_data):
    """LLaMA-Factory's multimodal layout: the record's `images`, one per `<image>` in order, each attached to its
    message with its path made absolute against the dataset's folder."""
    info = str(peer_data / "dataset_info.json")
    (spec,) = resolve_datasets(["mllm_demo"], dataset_info=info, types=TYPES)
    records = list(iter_records(spec, TYPES))
    rows = json.loads((peer_data / "mllm_demo.json").read_text())
    assert len(records) == len(rows)
    for record, row in zip(records, rows):
        expected = [str(peer_data / p) for p in row["images"]]
        attached = [img for m in record.messages for img in m.get("images", [])]
        assert attached == expected and all(Path(p).is_file() for p in attached)
        for m in record.messages:
            assert m["content"].count("<image>") == len(m.get("images", []))
    first = records[0].messages
    assert [len(m.get("images", [])) for m in first] == [1, 0, 1, 0]  # "<image>Who are they?" / "...doing?<image>"


def test_dataset_info_entries(peer_data):
    info = str(peer_data / "dataset_info.json")
    ident, glaive = resolve_datasets(["identity", "glaive_toolcall_en_demo"], dataset_info=info, types=TYPES)
    assert (ident.name, ident.format, ident.path) == ("identity", "alpaca", str(peer_data / "identity.json"))
    assert (glaive.format, glaive.columns["messages"], glaive.columns["tools"]) == (
        "sharegpt",
        "conversations",
        "tools",
    )
    assert len(list(iter_records(ident, TYPES))) == 91 and len(list(iter_records(glaive, TYPES))) == 300
    hub = resolve_datasets(["alpaca_en", "adgen_train"], dataset_info=info, types=TYPES)
    assert (hub[0].path, hub[0].format) == ("llamafactory/alpaca_en", "alpaca")
    assert (hub[1].split, hub[1].columns["prompt"], hub[1].columns["response"]) == ("train", "content", "summary")


GOOD = {"messages": [{"role": "user", "content": "Task: x"}, {"role": "assistant", "content": "ok"}]}


def test_openai_tool_calls_tools_and_spans(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You help."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "noise "},
                    {"type": "text", "text": "the door opened", "semantic_type": "KEY_EVENT"},
                    {"type": "text", "value": " more"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
            },
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "done", "loss_weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    (record,), _ = load(write_jsonl(tmp_path / "a.jsonl", [row]))
    user = record.messages[1]
    assert user["content"] == "noise the door opened more"
    assert user["spans"] == [(6, 21, "KEY_EVENT")] and user["content"][6:21] == "the door opened"
    call = record.messages[2]
    assert call["content"] == "" and call["tool_calls"] == [
        {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}, "id": "c1"}
    ]
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert record.tools == row["tools"]


def test_sharegpt_system_column_parallel_calls_and_openai_layout_tags(tmp_path):
    calls = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": '{"x": [1]}'}]
    row = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "ok"},
        ],
        "tools": json.dumps([{"name": "a"}, {"name": "b"}]),
    }
    (record,), _ = load(write_jsonl(tmp_path / "a.jsonl", [row]), format="sharegpt")
    assert plain(record.messages)[0] == {"role": "system", "content": "Be brief."}
    assert [c["function"] for c in record.messages[2]["tool_calls"]] == [
        {"name": "a", "arguments": {}},
        {"name": "b", "arguments": {"x": [1]}},
    ]
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    (record,), _ = load(
        write_jsonl(tmp_path / "b.jsonl", [GOOD]), format="sharegpt", columns={"messages": "messages"}, tags=tags
    )
    assert plain(record.messages) == GOOD["messages"]


def test_alpaca_columns_system_history(tmp_path):
    row = {"q": "Add", "ctx": "1 and 2", "a": "3", "sys": "Math.", "hist": [["hi", "hello"]], "id": 4}
    columns = {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}
    (record,), _ = load(write_jsonl(tmp_path / "a.jsonl", [row]), format="alpaca", columns=columns)
    assert plain(record.messages) == [
        {"role": "system", "content": "Math."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    (record,), _ = load(write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Say hi", "output": "hi"}]), format="alpaca")
    assert plain(record.messages)[0] == {"role": "user", "content": "Say hi"}  # no input column: the prompt alone


def test_image_placeholder_in_text_stays_text(tmp_path):
    row = {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "a cat"}]}
    (record,), _ = load(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert record.messages[0]["content"] == "<image>What is it?"


SHAREGPT = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[]"}
ALPACA = {"instruction": "q", "input": "", "output": "a"}
BAD = [
    ("alpaca", {"question": "q", "output": "a"}, "missing column: no 'instruction' key .*set columns.prompt"),
    ("alpaca", {"instruction": 3, "output": "a"}, "non-string column: 'instruction' \\(prompt\\) is a int"),
    ("alpaca", {**ALPACA, "history": [["only one"]]}, "malformed history: column 'history' item 0"),
    ("sharegpt", {"messages": GOOD["messages"]}, "no 'conversations' key .*set format: messages"),
    (
        "sharegpt",
        {"conversations": [{"from": "bot", "value": "x"}]},
        "unknown role: message 0 has from 'bot' \\(known: human, gpt, system, observation, function_call\\)",
    ),
    ("sharegpt", {**SHAREGPT, "tools": "[{name: f}]"}, "tools not JSON: column 'tools' is not JSON"),
    ("sharegpt", {**SHAREGPT, "tools": '{"name": "f"}'}, "malformed tools: column 'tools' must be a list of objects"),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f(x)"}]},
        "tool call not JSON: message 1 \\(function_call\\) has a value that is not JSON",
    ),
    (
        "sharegpt",
        {**SHAREGPT, "system": "s", "conversations": [{"from": "system", "value": "t"}]},
        "system given twice",
    ),
    ("sharegpt", {**SHAREGPT, "source": "web"}, "unused key: the record has 'source'"),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "part without text: message 0 part 0",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
        "malformed image part: message 0 part 0 needs exactly one of image, image_url, path, url, it has none",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]},
        "video part: videos are not supported yet",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "see <image>"}]}]},
        "placeholder in a text part: message 0 part 0 holds <image>",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "semantic_type": "HOT"}]}]},
        "unknown semantic_type: message 0 part 0 has semantic_type 'HOT'",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": "q", "loss_weight": 1.0}]},
        "loss weight: message 0 \\(user\\) has loss_weight 1.0; per-message loss weights other than role-based",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}]},
        "malformed tool call: message 0 \\(user\\) has tool_calls",
    ),
    ("messages", {**GOOD, "images": ["a.jpg"]}, "placeholder count: the messages hold 0 <image> placeholders and col"),
    ("messages", {**GOOD, "videos": ["a.mp4"]}, "video not supported: the record has videos in column 'videos'"),
]


@pytest.mark.parametrize("fmt, row, problem", BAD)
def test_bad_record_names_file_line_and_problem_and_is_skipped(tmp_path, fmt, row, problem):
    good = {"sharegpt": SHAREGPT, "alpaca": ALPACA, "messages": GOOD}[fmt]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row, good])
    with pytest.raises(DataError) as info:
        load(path, format=fmt)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and "\n" not in message
    assert __import__("re").search(problem, message), message
    records, report = load(path, on_error="skip", format=fmt)
    assert [r.line for r in records] == [1, 2, 4] and [e.line for e in report.skipped] == [3]
    assert report.kept == 3 and "1 skipped" in report.summary()


def test_ignore_keys_apply_to_every_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{**SHAREGPT, "source": "web"}])
    records, _ = load(path, format="sharegpt", ignore_keys=("id", "source"))
    assert len(records) == 1


def test_max_samples_keeps_the_first_valid_records(tmp_path):
    rows = [GOOD, {"messages": []}, GOOD, GOOD, GOOD]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    records, report = load(path, on_error="skip", max_samples=2)
    assert [r.line for r in records] == [1, 3] and report.kept == 2 and len(report.skipped) == 1


def test_spec_built_by_hand_defaults_to_messages(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    (record,) = list(iter_records(DatasetSpec(path=str(path)), TYPES))
    assert plain(record.messages) == GOOD["messages"]
    assert DatasetSpec(path=str(path)).name == "a"
