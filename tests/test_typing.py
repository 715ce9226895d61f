"""Typing rules (explicit > regex rules > role map > dataset default > run default) and the per-rule token report."""

import json
import pickle

import pytest

from hsa_train.data.loader import iter_records
from hsa_train.data.spec import DatasetSpec, resolve_datasets
from hsa_train.data.typing import TypeRules, TypingReport
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()
GC, KE, PN = TYPES.names


def rules_of(**entry):
    (spec,) = resolve_datasets([{"path": "x.jsonl", **entry}], types=TYPES)
    return TypeRules(spec, TYPES)


def msg(role, content, stype=None):
    return {"role": role, "content": content, "semantic_type": stype}


def typed(rules, *messages):
    return [(m["semantic_type"], m["type_rule"]) for m in rules.apply(list(messages))]


def test_precedence_explicit_rules_role_dataset_default():
    rules = rules_of(
        semantic_type_rules=[
            {"pattern": "^Task:", "type": GC},
            {"pattern": "door", "type": KE, "role": "tool"},
            {"pattern": "o", "type": KE},
        ],
        semantic_type_by_role={"user": PN, "system": GC},
        default_semantic_type=KE,
    )
    out = typed(
        rules,
        msg("user", "Task: go", stype=PN),  # explicit wins over the matching first rule
        msg("user", "Task: go"),  # the first matching rule, before the role map
        msg("assistant", "the door"),  # rule 1 needs role tool: rule 2 matches
        msg("tool", "a door!"),  # rule 1
        msg("user", "yes"),  # no rule: role map
        msg("assistant", "yes"),  # no rule, no role: dataset default
    )
    assert out == [
        (PN, "explicit"),
        (GC, "rule:0:^Task:"),
        (KE, "rule:2:o"),
        (KE, "rule:1:door"),
        (PN, "role:user"),
        (KE, "dataset_default"),
    ]


def test_rules_search_anywhere_and_run_default():
    rules = rules_of(semantic_type_rules=[{"pattern": "KEY", "type": KE}])
    assert typed(rules, msg("user", "a KEY b"), msg("assistant", "plain")) == [(KE, "rule:0:KEY"), (PN, "default")]
    other = SemanticTypes(("A", "B"), "B")
    assert typed(TypeRules(None, other), msg("user", "x")) == [("B", "default")]
    with pytest.raises(ValueError, match="unknown semantic type 'KEY_EVENT'"):
        TypeRules(DatasetSpec(path="x", default_semantic_type=KE), other)  # a spec built by hand is checked too


def test_span_types_are_kept_and_records_are_typed_by_their_dataset(tmp_path):
    row = {
        "system": "You are a robot.",
        "conversations": [
            {"from": "human", "value": "Task: pick the apple"},
            {"from": "gpt", "value": "moving"},
        ],
    }
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "EVENT", "semantic_type": KE}],
            },
            {"role": "assistant", "content": "y"},
        ]
    }
    (tmp_path / "s.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "m.jsonl").write_text(json.dumps(parts) + "\n")
    sg, msgs = resolve_datasets(
        [
            {
                "path": str(tmp_path / "s.jsonl"),
                "format": "sharegpt",
                "semantic_type_by_role": {"system": GC},
                "semantic_type_rules": [{"pattern": "^Task:", "type": GC, "role": "user"}],
            },
            {"path": str(tmp_path / "m.jsonl"), "default_semantic_type": PN},
        ],
        types=TYPES,
    )
    (record,) = list(iter_records(sg, TYPES))
    assert [(m["semantic_type"], m["type_rule"]) for m in record.messages] == [
        (GC, "role:system"),
        (GC, "rule:0:^Task:"),
        (PN, "default"),
    ]
    (record,) = list(iter_records(msgs, TYPES))
    user = record.messages[0]
    assert (user["semantic_type"], user["type_rule"], user["spans"]) == (PN, "dataset_default", [(1, 6, KE)])


def test_report_counts_against_hand_computed_numbers():
    messages = [
        {"role": "system", "content": "s", "semantic_type": GC, "type_rule": "role:system"},
        {"role": "user", "content": "u", "semantic_type": PN, "type_rule": "default", "spans": [(0, 1, KE)]},
        {"role": "assistant", "content": "a", "semantic_type": KE, "type_rule": "rule:0:^A"},
    ]
    g, k, p = 0, 1, 2
    #              template  system(3)  user: 2 PN, 2 KE (span)  assistant(3)  template
    message_index = [-1, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1, -1]
    semantic_ids = [p, g, g, g, p, k, k, p, k, k, k, p, p]
    report = TypingReport()
    report.add(messages, message_index, semantic_ids, TYPES.names)
    expected = {
        GC: {"role:system": 3},
        KE: {"rule:0:^A": 3, "span": 2},
        PN: {"default": 2, "template": 3},
    }
    assert report.as_dict() == expected and report.total == 13
    other = TypingReport()
    other.add(messages[:1], [0, -1], [g, p], TYPES.names)
    merged = pickle.loads(pickle.dumps(report)).merge(other)  # worker reports travel pickled
    assert merged.as_dict()[GC]["role:system"] == 4 and merged.as_dict()[PN]["template"] == 4 and merged.total == 15
    assert TypingReport.from_dict(merged.as_dict()).as_dict() == merged.as_dict()
    lines = merged.summary()
    assert lines[0].split() == ["type", "rule", "tokens", "share"] and lines[-1].split()[:2] == ["total", "15"]
    assert any(line.split()[:3] == [GC, "role:system", "4"] for line in lines)
    with pytest.raises(ValueError, match="2 message indices for 1 type ids"):
        report.add(messages, [0, 0], [g], TYPES.names)
    assert TypingReport().summary() == ["no tokens typed"]
