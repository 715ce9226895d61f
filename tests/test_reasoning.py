"""Reasoning traces: LLaMA-Factory v1's `reasoning` and `tool_call` content parts (and OpenAI's reasoning_content)
read against the raw JSON, the reasoning block rendered before the text, `data.train_reasoning` on real-size
vocabularies and two templates (the trained tokens are what generation after the block produces), a reasoning
part with its own type, and the demo file training through dataset_info.json."""

from __future__ import annotations

import json

import pytest
from conftest import PEER_DATA, assert_ran, run_cli, run_in_process
from test_tokenizer import decode, render, trained_runs, with_template

from hsa_train.data import SemanticTokenizer
from hsa_train.data.loader import LoadReport, iter_records
from hsa_train.data.spec import resolve_datasets
from hsa_train.types import IGNORE_INDEX, SemanticTypes

TYPES = SemanticTypes()
FILE = PEER_DATA / "reason_tool_use_demo_50.jsonl"


def load(entry, on_error="raise"):
    [spec] = resolve_datasets([entry], None, TYPES)
    report = LoadReport()
    return list(iter_records(spec, TYPES, on_error, report)), report


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def block(thought: str) -> str:
    return f"<think>\n{thought.strip(chr(10))}\n</think>\n\n"


def test_reasoning_and_tool_call_parts_read_as_the_raw_file_says():
    raw = [json.loads(line) for line in FILE.read_text().splitlines()]
    records, report = load({"path": str(FILE)})
    assert report.kept == len(records) == len(raw) == 50
    calls = reasoned = 0
    for record, row in zip(records, raw):
        assert len(record.messages) == len(row["messages"])
        for got, msg in zip(record.messages, row["messages"]):
            parts = msg["content"]
            text = "".join(p["value"] for p in parts if p["type"] == "text")
            thought = "".join(p["value"] for p in parts if p["type"] == "reasoning")
            want_calls = [json.loads(p["value"]) for p in parts if p["type"] == "tool_call"]
            assert got["role"] == msg["role"]
            if thought:
                reasoned += 1
                assert got["content"] == block(thought) + text.lstrip("\n")
                assert got["reasoning"] == (0, len(block(thought)))
            else:
                assert got["content"] == text and "reasoning" not in got
            got_calls = [{"name": c["function"]["name"], **c["function"]} for c in got.get("tool_calls", [])]
            assert [(c["name"], c["arguments"]) for c in got_calls] == [(c["name"], c["arguments"]) for c in want_calls]
            calls += len(want_calls)
    assert reasoned == 112 and calls == 68  # every part of the file


def test_a_reasoning_part_can_carry_its_own_type_and_openai_reasoning_content_reads_alike(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Task: open the door."},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "reasoning", "value": "The door is north.", "semantic_type": "PROCESS_NOISE"},
                        {"type": "text", "value": "go north", "semantic_type": "KEY_EVENT"},
                    ],
                },
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Task: open the door."},
                {"role": "assistant", "content": "go north", "reasoning_content": "The door is north."},
            ]
        },
    ]
    (typed, plain), _ = load({"path": str(write_jsonl(tmp_path / "r.jsonl", rows))})
    n = len(block("The door is north."))
    assert typed.messages[1]["content"] == plain.messages[1]["content"] == block("The door is north.") + "go north"
    assert typed.messages[1]["spans"] == [(0, n, "PROCESS_NOISE"), (n, n + 8, "KEY_EVENT")]
    assert plain.messages[1]["reasoning"] == typed.messages[1]["reasoning"] == (0, n)


@pytest.mark.parametrize(
    "message, problem",
    [
        ({"role": "user", "content": "hi", "reasoning_content": "hm"}, "only assistants reason"),
        (
            {"role": "assistant", "content": [{"type": "reasoning", "value": "a"}], "reasoning_content": "b"},
            "needs one reasoning",
        ),
        (
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "value": "a", "semantic_type": "KEY_EVENT"},
                    {"type": "reasoning", "value": "b", "semantic_type": "PROCESS_NOISE"},
                ],
            },
            "different semantic_types",
        ),
        ({"role": "assistant", "content": [{"type": "tool_call", "value": "{bad"}]}, "tool call not JSON"),
        ({"role": "assistant", "content": [{"type": "reasoning"}]}, "needs exactly one of 'text' or 'value'"),
    ],
)
def test_bad_reasoning_is_refused_with_the_message_named(tmp_path, message, problem):
    rows = [{"messages": [{"role": "user", "content": "q"}, message]}]
    if message["role"] == "user":
        rows = [{"messages": [message, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=problem):
        load({"path": str(path)})


def reasoning_conversation():
    """The demo file's first record with reasoning and text in one turn, tool calls left out (templates differ in
    how they render them: test_tokenizer's business)."""
    for line in FILE.read_text().splitlines():
        row = json.loads(line)
        if not any(p["type"] == "tool_call" for m in row["messages"] for p in m["content"]):
            return row
    raise AssertionError("the demo file has no record without tool calls")


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_untrained_reasoning_is_context_and_the_text_after_it_trains_as_generated(real_vocab, template, tmp_path):
    row = reasoning_conversation()
    [record], _ = load({"path": str(write_jsonl(tmp_path / "one.jsonl", [row]))})
    messages = record.messages
    tok = with_template(real_vocab, template)
    with_thought = SemanticTokenizer(tok).encode(messages)
    without = SemanticTokenizer(tok, train_reasoning=False).encode(messages)
    assert without["input_ids"] == with_thought["input_ids"]  # the model sees the reasoning either way
    assert without["semantic_ids"] == with_thought["semantic_ids"]
    ids = without["input_ids"]
    assert decode(tok, ids) == render(tok, messages)
    assistants = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    runs = trained_runs(without["labels"])
    assert len(runs) == len(assistants) == len(trained_runs(with_thought["labels"]))
    for j, (k, end) in zip(assistants, runs):
        prompt = render(tok, messages[:j], gen=True)
        turn = render(tok, messages[: j + 1])[len(prompt) :]
        thought = messages[j]["content"][: messages[j]["reasoning"][1]]
        assert turn.startswith(thought.strip())  # the block opens the turn (Llama-3's template trims the content)
        after = turn[turn.index("</think>") + len("</think>") :]
        # the trained tokens: exactly the text after the block (and the end of turn), as the tokenizer splits it
        assert decode(tok, ids[k:end]).lstrip("\n") == after.lstrip("\n")
        assert without["labels"][k:end] == ids[k:end]
        assert all(label == IGNORE_INDEX for label in without["labels"][:k][-5:])  # the block before it: context
    assert sum(x != IGNORE_INDEX for x in without["labels"]) < sum(x != IGNORE_INDEX for x in with_thought["labels"])


def test_the_reasoning_file_trains_through_dataset_info(tmp_path):
    (tmp_path / "reason_tool_use_demo_50.jsonl").write_bytes(FILE.read_bytes())
    info = {
        "reason_tool_use": {
            "file_name": "reason_tool_use_demo_50.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "tools": "tools"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system", "observation_tag": "tool"},
        }
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    args = [
        f"data.dataset_info={tmp_path / 'dataset_info.json'}", "data.datasets=[reason_tool_use]",
        "data.train_files=[]", "data.cutoff_len=8192", "data.eval_ratio=0.1", "train.max_steps=1",
        "train.micro_batch_size=2", "logging.progress=none", "model.arch.hidden_size=32",
        "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2",
    ]  # fmt: skip
    assert_ran(run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))  # as a user runs it
    runs = {True: json.loads((tmp_path / "run" / "metrics.json").read_text())}
    runs[False] = run_in_process(tmp_path / "context", *args, "data.train_reasoning=false")
    counts = {k: m["data"]["datasets"]["reason_tool_use"] for k, m in runs.items()}
    assert counts[True]["records"] == counts[False]["records"] == 50
    trained = {k: c["trained_tokens_per_sample"]["mean"] for k, c in counts.items()}
    assert trained[False] < trained[True] / 2  # most of the file's assistant text is reasoning
    assert all(len(m["train_losses"]) == 1 for m in runs.values())


# A template with its own reasoning field, as Qwen3's: `reasoning_content`, or a <think> block read from the content
# (Qwen3's also drops the reasoning of turns before the last user message, which is not prefix-stable: left out).
REASONING_FIELD_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set ns = namespace(thought='') %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content %}"
    "{%- set ns.thought = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set ns.thought = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if ns.thought %}{{- '<think>\\n' + ns.thought.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_the_block_is_what_a_template_with_a_reasoning_field_renders_from_it(qwen_split_bpe, tmp_path):
    """The reference: the template given each turn's reasoning in its own field (reasoning_content), through
    transformers; ours renders the same text, token for token, trained as generated."""
    row = reasoning_conversation()
    [record], _ = load({"path": str(write_jsonl(tmp_path / "one.jsonl", [row]))})
    tok = qwen_split_bpe
    tok.chat_template = REASONING_FIELD_TEMPLATE
    fielded = []
    for msg in row["messages"]:
        parts = msg["content"]
        entry = {"role": msg["role"], "content": "".join(p["value"] for p in parts if p["type"] == "text")}
        thought = "".join(p["value"] for p in parts if p["type"] == "reasoning")
        if thought:
            entry["reasoning_content"] = thought
        fielded.append(entry)
    reference = tok.apply_chat_template(fielded, tokenize=False)
    features = SemanticTokenizer(tok).encode(record.messages)
    assert decode(tok, features["input_ids"]) == reference
    assert features["input_ids"] == tok(reference, add_special_tokens=False)["input_ids"]
