"""The recall benchmark's data: regenerated bit-identically, and built the way the README describes."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

from hsa_train.data import SemanticTokenizer
from hsa_train.data.dataset import encode_files

RECALL = ROOT / "data" / "recall"
FILES = ["train.jsonl", "eval_1x.jsonl", "eval_2x.jsonl", "eval_4x.jsonl"]


def test_generator_reproduces_the_committed_files(tmp_path):
    cmd = [sys.executable, str(ROOT / "data" / "generate_recall.py"), "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (RECALL / name).read_bytes(), name


def test_answers_need_the_task_and_the_key_event():
    """Every answer names the furniture of the one KEY_EVENT message and the room of the task; the task's room is
    the only room no noise message can stand in for at the answer (it may also appear in the noise)."""
    for name in FILES[1:]:
        for line in (RECALL / name).read_text().splitlines()[:50]:
            messages = json.loads(line)["messages"]
            task = messages[1]["content"]
            events = [m["content"] for m in messages if m.get("semantic_type") == "KEY_EVENT" and m["role"] == "user"]
            answer = messages[-1]["content"]
            furniture = answer.split("It was on the ")[1].split(".")[0]
            room = answer.split("It goes to the ")[1].rstrip(".")
            assert messages[1]["semantic_type"] == "GLOBAL_CONDITION" and task.endswith(f" in the {room}.")
            assert events[0].endswith(f" is on the {furniture}.")
            assert messages[-1]["semantic_type"] == "KEY_EVENT" and messages[-1]["role"] == "assistant"


def test_eval_sets_are_two_and_four_times_the_training_length(tokenizer, tmp_path):
    st = SemanticTokenizer(tokenizer, max_length=None)
    mean = {}
    for name in FILES:
        lines = (RECALL / name).read_text().splitlines()[:60]
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        samples, _ = encode_files([str(path)], st)
        mean[name] = sum(len(s.features["input_ids"]) for s in samples) / len(samples)
        assert all(s.answer is not None for s in samples)
    assert 1.8 < mean["eval_2x.jsonl"] / mean["train.jsonl"] < 2.3
    assert 3.7 < mean["eval_4x.jsonl"] / mean["train.jsonl"] < 4.5
    assert abs(mean["eval_1x.jsonl"] / mean["train.jsonl"] - 1) < 0.1
