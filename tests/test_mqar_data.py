"""The associative-recall task's data (data/generate_mqar.py): regenerated bit-identically, and each answer is
what the trajectory says, checked by reading the messages again here, not with the generator's own state."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from hsa_train.data import SemanticTokenizer
from hsa_train.data.dataset import encode_files

MQAR = ROOT / "data" / "mqar"
SETS = ["train", "valid", "eval_1x", "eval_2x", "eval_4x"]
FILES = [f"{p}{s}.jsonl" for p in ("", "latest_") for s in SETS]
EVENT = re.compile(r"^Event: door (\w+) (\d)\.$")
QUESTION = re.compile(r"^Question: door (\w+)\?$")
ANSWER = re.compile(r"^The door (\w+) (\d)\.$")


def test_generator_reproduces_the_committed_files(tmp_path):
    cmd = [sys.executable, str(ROOT / "data" / "generate_mqar.py"), "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (MQAR / name).read_bytes(), name


@pytest.mark.parametrize("prefix,doors,changes", [("", 4, 0), ("latest_", 3, 2)])
def test_every_answer_is_the_latest_code_its_events_gave(prefix, doors, changes):
    noise_digits = set()
    for name in SETS:
        for line in (MQAR / f"{prefix}{name}.jsonl").read_text().splitlines()[:100]:
            messages = json.loads(line)["messages"]
            assert messages[0]["role"] == "system" and messages[0]["semantic_type"] == "GLOBAL_CONDITION"
            latest, seen, asked, pending = {}, {}, [], None
            for m in messages[1:]:
                event, question, answer = (r.match(m["content"]) for r in (EVENT, QUESTION, ANSWER))
                if m["role"] == "user" and event:
                    assert m["semantic_type"] == "KEY_EVENT" and not asked  # every event comes before the questions
                    latest[event[1]] = event[2]
                    seen[event[1]] = seen.get(event[1], 0) + 1
                elif m["role"] == "user" and question:
                    assert m["semantic_type"] == "GLOBAL_CONDITION" and pending is None
                    pending = question[1]
                elif m["role"] == "assistant":
                    assert answer and answer[1] == pending and answer[2] == latest[pending], (name, m["content"])
                    asked.append(pending)
                    pending = None
                else:
                    assert m["semantic_type"] == "PROCESS_NOISE" and m["content"].startswith("Obs: ") and not asked
                    noise_digits.update(re.findall(r"\d", m["content"]))
            assert sorted(asked) == sorted(latest) and len(latest) == doors  # every door asked, once
            assert sorted(seen.values()) == [1] * (doors - changes) + [2] * changes
    assert noise_digits == set("0123456789")  # the noise uses the codes' digits: it is a distractor


def test_eval_sets_are_two_and_four_times_the_training_length(tokenizer, tmp_path):
    st = SemanticTokenizer(tokenizer, max_length=None)
    mean = {}
    for name in ["train.jsonl", "eval_1x.jsonl", "eval_2x.jsonl", "eval_4x.jsonl"]:
        path = tmp_path / name
        path.write_text("\n".join((MQAR / name).read_text().splitlines()[:60]) + "\n")
        samples, _ = encode_files([str(path)], st)
        mean[name] = sum(len(s.features["input_ids"]) for s in samples) / len(samples)
    assert 1.6 < mean["eval_2x.jsonl"] / mean["train.jsonl"] < 2.4
    assert 3.3 < mean["eval_4x.jsonl"] / mean["train.jsonl"] < 4.7
    assert abs(mean["eval_1x.jsonl"] / mean["train.jsonl"] - 1) < 0.1
