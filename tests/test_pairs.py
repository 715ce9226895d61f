"""Preference pairs (`ranking: true`) read from LLaMA-Factory's demo files and our own format, against the raw JSON
read here: the prompt both sides share, each side's continuation, typing alike on both sides, and bad pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PEER_DATA
from hydra import compose, initialize_config_module

from hsa_train.config import ConfigError, validate
from hsa_train.data.loader import DataError, LoadReport, iter_records
from hsa_train.data.spec import resolve_datasets
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()


def pairs(entry, dataset_info=None, on_error="raise"):
    [spec] = resolve_datasets([entry], dataset_info, TYPES)
    report = LoadReport()
    return list(iter_records(spec, TYPES, on_error, report)), report


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def roles_and_texts(messages):
    return [(m["role"], m["content"]) for m in messages]


def test_llamafactory_sharegpt_pairs_through_dataset_info():
    raw = json.loads((PEER_DATA / "dpo_en_demo.json").read_text())
    records, report = pairs("dpo_en_demo", str(PEER_DATA / "dataset_info.json"))
    assert report.kept == len(records) == len(raw) == 300 and not report.skipped
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    for record, row in zip(records, raw):
        prompt = [(role[t["from"]], t["value"]) for t in row["conversations"]]
        assert record.is_pair and record.prompt_len == len(prompt)
        assert roles_and_texts(record.messages) == prompt + [("assistant", row["chosen"]["value"])]
        assert roles_and_texts(record.rejected) == prompt + [("assistant", row["rejected"]["value"])]
    assert max(r.prompt_len for r in records) > 5  # multi-turn prompts are in the demo


def test_llamafactory_v1_pairs_share_their_common_start():
    raw = [json.loads(line) for line in (PEER_DATA / "v1_dpo_demo.jsonl").read_text().splitlines()]
    entry = {
        "path": str(PEER_DATA / "v1_dpo_demo.jsonl"),
        "ranking": True,
        "columns": {"messages": None, "chosen": "chosen_messages", "rejected": "rejected_messages"},
    }
    records, _ = pairs(entry)
    assert len(records) == len(raw) == 10
    for record, row in zip(records, raw):
        chosen = [(m["role"], "".join(p["value"] for p in m["content"])) for m in row["chosen_messages"]]
        rejected = [(m["role"], "".join(p["value"] for p in m["content"])) for m in row["rejected_messages"]]
        n = 0
        while chosen[n] == rejected[n]:
            n += 1
        assert record.prompt_len == n >= 1
        assert roles_and_texts(record.messages) == chosen and roles_and_texts(record.rejected) == rejected


AGENT_PAIR = {
    "messages": [
        {"role": "system", "content": "Task: open the red door."},
        {"role": "user", "content": "Obs: a hallway."},
    ],
    "chosen": [
        {"role": "assistant", "content": "look left"},
        {"role": "user", "content": "Event: a red key."},
        {"role": "assistant", "content": "pick up the key"},
    ],
    "rejected": {"role": "assistant", "content": "forward"},
}
RULES = [{"pattern": "^Task:", "type": "GLOBAL_CONDITION"}, {"pattern": "^Event:", "type": "KEY_EVENT"}]


def test_our_pairs_with_a_multi_turn_side_are_typed_alike(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [AGENT_PAIR])
    [record], _ = pairs({"path": str(path), "ranking": True, "semantic_type_rules": RULES})
    assert record.prompt_len == 2
    assert [m["content"] for m in record.messages[2:]] == ["look left", "Event: a red key.", "pick up the key"]
    assert roles_and_texts(record.rejected[2:]) == [("assistant", "forward")]
    types = [m["semantic_type"] for m in record.messages]
    assert types == ["GLOBAL_CONDITION", "PROCESS_NOISE", "PROCESS_NOISE", "KEY_EVENT", "PROCESS_NOISE"]
    assert [m["semantic_type"] for m in record.rejected] == [*types[:2], "PROCESS_NOISE"]
    assert record.messages[0] is not record.rejected[0]  # each side owns its messages


def test_alpaca_pairs(tmp_path):
    row = {"instruction": "Add", "input": "2 and 3", "chosen": "5", "rejected": "6", "system": "Be exact."}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    [record], _ = pairs({"path": str(path), "format": "alpaca", "ranking": True})
    assert roles_and_texts(record.messages) == [("system", "Be exact."), ("user", "Add\n2 and 3"), ("assistant", "5")]
    assert roles_and_texts(record.rejected)[-1] == ("assistant", "6") and record.prompt_len == 2


BAD_PAIRS = [
    ({**AGENT_PAIR, "rejected": AGENT_PAIR["chosen"]}, "malformed pair: chosen and rejected are the same"),
    ({**AGENT_PAIR, "rejected": {"role": "user", "content": "hm"}}, "nothing to prefer: the rejected side"),
    ({k: v for k, v in AGENT_PAIR.items() if k != "rejected"}, "missing column: no 'rejected'"),
    ({**AGENT_PAIR, "rejected": {"role": "robot", "content": "x"}}, "unknown role: message 2"),
]


@pytest.mark.parametrize("row, problem", BAD_PAIRS)
def test_bad_pairs_name_the_line_and_the_problem(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [AGENT_PAIR, row])
    with pytest.raises(DataError, match=r"p\.jsonl:2: ") as info:
        pairs({"path": str(path), "ranking": True})
    assert problem in str(info.value)
    records, report = pairs({"path": str(path), "ranking": True}, on_error="skip")
    assert len(records) == 1 and len(report.skipped) == 1  # skipped and counted, never dropped silently


def test_v1_pairs_without_a_common_prompt_or_difference_are_refused(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    other = [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]
    rows = [{"c": conv, "r": conv}, {"c": conv, "r": other}, {"c": conv, "r": conv[:1]}]
    entry = {"path": str(write_jsonl(tmp_path / "v.jsonl", rows)), "ranking": True}
    entry["columns"] = {"messages": None, "chosen": "c", "rejected": "r"}
    _, report = pairs(entry, on_error="skip")
    problems = [e.problem for e in report.skipped]
    assert problems == [
        "malformed pair: chosen and rejected are the same conversation; give two answers",
        "malformed pair: chosen and rejected share no first message; give them a common prompt",
        "malformed pair: one side is the start of the other; give each side its own answer",
    ]


def test_supervised_runs_refuse_preference_datasets_before_loading():
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose("config", [f"data.dataset_info={PEER_DATA / 'dataset_info.json'}", "data.datasets=[dpo_en_demo]"])
    with pytest.raises(ConfigError, match=r"data: dpo_en_demo holds preference pairs \(ranking: true\)"):
        validate(cfg)


# -- pairs encoded: two samples that share their prompt, only the continuations trained ----------------------------
def prepared(tmp_path, entry, tokenizer, pre=None, train_on="assistant", dataset_info=None):
    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.prepare import Preprocess, prepare

    [spec] = resolve_datasets([entry], dataset_info, TYPES)
    st = SemanticTokenizer(tokenizer, train_on=train_on)
    return prepare(spec, st, pre or Preprocess(), tmp_path / "cache")


def trained_text(tokenizer, sample):
    f = sample.features
    return tokenizer.decode(f["input_ids"][f["labels"] != -100].tolist(), skip_special_tokens=False)


def first_trained(sample):
    return int(np.flatnonzero(sample.features["labels"] != -100)[0])


def test_demo_pairs_encode_as_two_samples_with_one_prompt(tmp_path, tokenizer):
    raw = json.loads((PEER_DATA / "dpo_en_demo.json").read_text())
    built = prepared(tmp_path, "dpo_en_demo", tokenizer, dataset_info=str(PEER_DATA / "dataset_info.json"))
    samples = built.samples
    assert len(samples) == 2 * len(raw)
    for k, row in enumerate(raw[:60]):
        chosen, rejected = samples[2 * k], samples[2 * k + 1]
        assert chosen.where == rejected.where
        assert trained_text(tokenizer, chosen) == row["chosen"]["value"] + "<|im_end|>\n"
        assert trained_text(tokenizer, rejected) == row["rejected"]["value"] + "<|im_end|>\n"
        start = first_trained(chosen)
        assert first_trained(rejected) == start
        assert np.array_equal(chosen.features["input_ids"][:start], rejected.features["input_ids"][:start])
        prompt = tokenizer.decode(chosen.features["input_ids"][:start].tolist(), skip_special_tokens=False)
        assert prompt.endswith(row["conversations"][-1]["value"] + "<|im_end|>\n<|im_start|>assistant\n")
    assert built.reports.trained.samples == len(samples)


@pytest.mark.parametrize(
    "train_on, expected", [("assistant", "look left.pick up the key."), ("last", "pick up the key.")]
)
def test_a_multi_turn_side_trains_its_assistant_turns_only(tmp_path, tokenizer, train_on, expected):
    path = write_jsonl(tmp_path / "p.jsonl", [AGENT_PAIR])
    built = prepared(tmp_path, {"path": str(path), "ranking": True}, tokenizer, train_on=train_on)
    chosen, rejected = built.samples[0], built.samples[1]
    end = "<|im_end|>\n"
    assert trained_text(tokenizer, chosen) == expected.replace(".", end)
    assert trained_text(tokenizer, rejected) == "forward" + end


def long_pair(rounds: int) -> dict:
    messages = [{"role": "system", "content": "Task: open the red door.", "semantic_type": "GLOBAL_CONDITION"}]
    for k in range(rounds):
        messages += [
            {"role": "user", "content": f"Obs: step {k}, a long grey corridor with nothing in it at all."},
            {"role": "assistant", "content": f"forward {k}"},
        ]
    messages.append({"role": "user", "content": "Obs: the door is red and shut."})
    return {
        "messages": messages,
        "chosen": [{"role": "assistant", "content": "open the door"}],
        "rejected": [
            {"role": "assistant", "content": "turn around and walk back down the whole corridor again"},
            {"role": "user", "content": "Obs: the corridor again."},
            {"role": "assistant", "content": "forward"},
        ],
    }


def test_truncation_drops_the_same_prompt_turns_on_both_sides_and_no_continuation(tmp_path, tokenizer):
    from hsa_train.data.prepare import Preprocess

    path = write_jsonl(tmp_path / "p.jsonl", [long_pair(30), long_pair(2)])
    entry = {"path": str(path), "ranking": True}
    full = prepared(tmp_path / "a", entry, tokenizer).samples
    cutoff = 400
    assert len(full[0]) > cutoff > len(full[3])
    cut = prepared(tmp_path / "b", entry, tokenizer, Preprocess(cutoff_len=cutoff, overlong="truncate"))
    samples, report = cut.samples, cut.reports.truncation
    assert report.truncated == 1 and report.seen == 2  # the pair counts once
    for k in (0, 1):
        chosen, rejected = samples[2 * k], samples[2 * k + 1]
        assert len(chosen) <= cutoff and len(rejected) <= cutoff
        start = first_trained(chosen)
        assert start == first_trained(rejected)
        assert np.array_equal(chosen.features["input_ids"][:start], rejected.features["input_ids"][:start])
        for mine, theirs in ((chosen, full[2 * k]), (rejected, full[2 * k + 1])):
            assert trained_text(tokenizer, mine) == trained_text(tokenizer, theirs)  # continuations whole
    prompt = tokenizer.decode(samples[0].features["input_ids"].tolist(), skip_special_tokens=False)
    assert "Task: open the red door." in prompt and "step 29" in prompt and "step 0," not in prompt
    with pytest.raises(DataError, match=r"p\.jsonl:1: cannot fit in data\.cutoff_len=40"):
        prepared(tmp_path / "c", entry, tokenizer, Preprocess(cutoff_len=40, overlong="truncate"))


def test_run_data_counts_pairs_split_weights_and_batches_chosen_then_rejected(tmp_path, tokenizer):
    from test_pipeline import data_cfg

    from hsa_train.data import SemanticCollator, SemanticTokenizer
    from hsa_train.data.pipeline import load_run_data

    st = SemanticTokenizer(tokenizer)
    collator = SemanticCollator.from_tokenizer(st)
    info = str(PEER_DATA / "dataset_info.json")
    cfg = dict(dataset_info=info, datasets=["dpo_en_demo"], cache_dir=str(tmp_path / "c"), eval_ratio=0.1)
    cfg["on_error"] = "skip"  # a few of the demo's pairs do not fit in 2,048 tokens of this tokenizer
    data = load_run_data(data_cfg(**cfg), st, collator, seed=0, pairs=True)
    train, held = data.train, data.eval
    pairs_kept = 300 - len(data.reports["dpo_en_demo"].load.skipped)
    assert 250 < pairs_kept < 300
    assert len(train.ids) + len(held) == pairs_kept and len(held) == round(0.1 * pairs_kept)  # pairs, not samples
    assert set(train.ids.tolist()).isdisjoint(int(i) for i in held.ids)  # no pair on both sides of the split
    batch = train.batch([0, 1])
    pairs = [train.pool[int(train.ids[r])] for r in (0, 1)]
    rows = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]  # chosen, chosen, rejected, rejected
    for row, sample in enumerate(rows):
        n = len(sample)
        assert batch["input_ids"][row, :n].tolist() == sample.features["input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == sample.features["labels"].tolist()
        assert int(batch["attention_mask"][row].sum()) == n
    assert train.where([0]) == [pairs[0][0].where] and pairs[0][0].where == pairs[0][1].where
    entry = {"path": str(PEER_DATA / "dpo_en_demo.json"), "format": "sharegpt", "ranking": True, "weight": 1.5}
    weighted = dict(cfg, eval_ratio=0.0, dataset_info=None, datasets=[entry])
    n = len(load_run_data(data_cfg(**weighted), st, collator, seed=0, pairs=True).train.ids)
    assert n == pairs_kept + round(0.5 * pairs_kept)  # weights count pairs: a whole copy and a seeded half
    with pytest.raises(ValueError, match="data.packing does not apply to preference pairs"):
        load_run_data(data_cfg(**cfg, packing=True), st, collator, seed=0, pairs=True)
