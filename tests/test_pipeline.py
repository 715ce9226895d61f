"""From dataset entries to training rows: the Arrow store, the cache (hit, and invalidation by each thing that
decides the content), workers, dataset weights, the seeded split, packing in the run's data, and the peer datasets
through `data.dataset_info`."""

from __future__ import annotations

import json
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import PEER_DATA, demo_subset

from hsa_train.data import DataError, SemanticCollator, SemanticTokenizer
from hsa_train.data.dataset import encode_files, split_ids
from hsa_train.data.pipeline import load_run_data, weighted_ids
from hsa_train.data.prepare import Preprocess, prepare
from hsa_train.data.spec import resolve_datasets
from hsa_train.model.loading import load_tokenizer

RULES = [{"pattern": "^Task:", "type": "GLOBAL_CONDITION"}]


def spec_of(path, **entry):
    return resolve_datasets([{"path": str(path), **entry}])[0]


def same_samples(a, b) -> bool:
    return len(a) == len(b) and all(
        all(np.array_equal(x.features[k], y.features[k]) for k in ("input_ids", "labels", "semantic_ids"))
        and x.answer == y.answer
        and x.where == y.where
        for x, y in zip(a, b)
    )


def test_prepared_samples_equal_the_in_memory_encoding(tmp_path, tokenizer):
    path = demo_subset(tmp_path / "a.jsonl", 12)
    st = SemanticTokenizer(tokenizer)
    built = prepare(spec_of(path), st, Preprocess(), tmp_path / "cache")
    reference, _ = encode_files([path], st)
    assert not built.cached and same_samples(built.samples, reference)
    assert built.samples[-1].where.endswith("a.jsonl:12") and built.samples[3:5][1].where.endswith(":5")
    assert list(built.samples.lengths) == [len(s.features["input_ids"]) for s in reference]


def test_cache_hit_and_each_invalidation(tmp_path, tokenizer):
    path = demo_subset(tmp_path / "a.jsonl", 6)
    root = tmp_path / "cache"
    st = SemanticTokenizer(tokenizer)
    first = prepare(spec_of(path), st, Preprocess(), root)
    again = prepare(spec_of(path), st, Preprocess(), root)
    assert again.cached and again.key == first.key and same_samples(again.samples, first.samples)

    os.utime(path, (time.time() + 5, time.time() + 5))  # touched, same bytes: still the same entry
    assert prepare(spec_of(path), st, Preprocess(), root).key == first.key

    def key_after(**change) -> str:
        p = prepare(change.get("spec", spec_of(path)), change.get("st", st), change.get("pre", Preprocess()), root)
        assert not p.cached
        return p.key

    keys = {first.key}
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # the file changed
    keys.add(key_after())
    path.write_text("\n".join(lines) + "\n")
    assert prepare(spec_of(path), st, Preprocess(), root).cached  # back as it was: found again

    other_template = load_tokenizer(None)
    other_template.chat_template = other_template.chat_template.replace("<|im_start|>", "<|im_start|> ")
    keys.add(key_after(st=SemanticTokenizer(other_template)))  # the template
    keys.add(key_after(st=SemanticTokenizer(tokenizer, ["GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE", "X"])))
    keys.add(key_after(st=SemanticTokenizer(tokenizer, train_on="all")))
    keys.add(key_after(st=SemanticTokenizer(tokenizer, train_on="last")))
    keys.add(key_after(spec=spec_of(path, semantic_type_rules=RULES)))  # the rules
    keys.add(key_after(spec=spec_of(path, semantic_type_by_role={"system": "GLOBAL_CONDITION"})))
    keys.add(key_after(pre=Preprocess(cutoff_len=4096)))  # the cutoff
    keys.add(key_after(pre=Preprocess(cutoff_len=4096, overlong="truncate")))
    assert len(keys) == 10
    assert prepare(spec_of(path, weight=3.0), st, Preprocess(), root).cached  # weights apply after the cache


def test_entries_are_keyed_by_the_code_the_process_runs(tmp_path, tokenizer, monkeypatch):
    """The data code's digest is read as prepare.py is imported: files edited under a running process (a
    benchmark's driver) do not give the old code's samples the new code's key."""
    from pathlib import Path

    from hsa_train.data import cache
    from hsa_train.data.prepare import Preparation

    before = Preparation(SemanticTokenizer(tokenizer), Preprocess(), tmp_path).common["code"]
    assert before == cache.code_digest()
    read_bytes = Path.read_bytes
    monkeypatch.setattr(
        Path, "read_bytes", lambda self: read_bytes(self) + (b"# edited" if self.suffix == ".py" else b"")
    )
    assert cache.code_digest() != before  # the files on disk changed...
    assert Preparation(SemanticTokenizer(tokenizer), Preprocess(), tmp_path).common["code"] == before  # ...not the code


def test_workers_give_the_same_samples_and_the_first_error(tmp_path, tokenizer):
    path = demo_subset(tmp_path / "a.jsonl", 9)
    st = SemanticTokenizer(tokenizer)
    one = prepare(spec_of(path), st, Preprocess(), tmp_path / "c1")
    two = prepare(spec_of(path), st, Preprocess(), tmp_path / "c2", num_proc=2)
    assert same_samples(one.samples, two.samples) and two.reports.load.kept == 9

    lines = path.read_text().splitlines()
    bad = json.loads(lines[4])
    bad["messages"][0]["role"] = "robot"
    lines[4] = json.dumps(bad)
    lines[6] = lines[6][:-5]  # malformed JSON
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl:5: unknown role"):
        prepare(spec_of(path), st, Preprocess(), tmp_path / "c3", num_proc=2)
    assert not [p for p in (tmp_path / "c3").iterdir() if not p.name.startswith("file_digests")]  # nothing left
    skipped = prepare(spec_of(path), st, Preprocess(on_error="skip"), tmp_path / "c4", num_proc=2)
    assert len(skipped.samples) == 7 and sorted(e.line for e in skipped.reports.load.skipped) == [5, 7]


def test_overlong_modes_are_counted(tmp_path, tokenizer):
    path = demo_subset(tmp_path / "a.jsonl", 8)
    st = SemanticTokenizer(tokenizer)
    lengths = prepare(spec_of(path), st, Preprocess(), tmp_path / "c").samples.lengths
    cutoff = int(np.median(lengths))
    over = int((lengths > cutoff).sum())
    with pytest.raises(DataError, match=rf"too long: \d+ tokens > data.cutoff_len={cutoff}"):
        prepare(spec_of(path), st, Preprocess(cutoff_len=cutoff), tmp_path / "c")
    dropped = prepare(spec_of(path), st, Preprocess(cutoff_len=cutoff, overlong="drop"), tmp_path / "c")
    assert len(dropped.samples) == 8 - over and dropped.reports.truncation.dropped == over
    cut = prepare(spec_of(path), st, Preprocess(cutoff_len=cutoff, overlong="truncate"), tmp_path / "c")
    assert len(cut.samples) == 8 and cut.reports.truncation.truncated == over and max(cut.samples.lengths) <= cutoff


def test_weights_and_split():
    ids = np.arange(10, 20)
    assert list(weighted_ids(ids, 1.0, 0)) == list(ids)
    twice_and_half = weighted_ids(ids, 2.5, 0)
    counts = np.bincount(twice_and_half - 10)
    assert len(twice_and_half) == 25 and set(counts) == {2, 3} and (counts == 3).sum() == 5
    assert list(weighted_ids(ids, 2.5, 0)) == list(twice_and_half)  # seeded
    half = weighted_ids(ids, 0.5, 1)
    assert len(half) == 5 and len(set(half)) == 5
    kept, held = split_ids(40, 0.1, seed=3)
    chosen = sorted(random.Random(3).sample(range(40), 4))  # a seeded choice of round(40 * 0.1) ids
    assert list(held) == chosen and list(kept) == [i for i in range(40) if i not in chosen]


def data_cfg(**over):
    base = dict(
        train_files=[],
        datasets=[],
        dataset_info=None,
        eval_files=[],
        eval_datasets=[],
        eval_ratio=0.0,
        eval_sets={},
        on_error="raise",
        cutoff_len=2048,
        overlong="truncate",
        keep_types=["GLOBAL_CONDITION"],
        noise_window=None,
        packing=False,
        train_on="assistant",
        pad_to_multiple_of=None,
        ignore_keys=["id"],
        cache=True,
        cache_dir=None,
        num_proc=1,
    )
    base.update(over)
    return SimpleNamespace(**base)


def test_peer_datasets_through_dataset_info_mix_pack_and_fingerprint(tmp_path, tokenizer):
    st = SemanticTokenizer(tokenizer)
    collator = SemanticCollator.from_tokenizer(st)
    info = str(PEER_DATA / "dataset_info.json")
    cfg = dict(dataset_info=info, datasets=["identity", "glaive_toolcall_en_demo"], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"glaive_toolcall_en_demo.json:\d+: cannot fit in data.cutoff_len=2048"):
        load_run_data(data_cfg(**cfg), st, collator, seed=0)  # one record's last turn alone is longer
    cfg["on_error"] = "skip"
    plain = load_run_data(data_cfg(**cfg), st, collator, seed=0)
    glaive = plain.reports["glaive_toolcall_en_demo"]
    failed = glaive.truncation.failed
    assert failed == len(glaive.load.skipped) > 0 and glaive.truncation.truncated > 0
    assert len(plain.train.ids) == 91 + 300 - failed and plain.uses_tools and not plain.train.packed
    assert set(plain.reports) == {"identity", "glaive_toolcall_en_demo"}
    packed = load_run_data(data_cfg(**cfg, packing=True), st, collator, seed=0)
    train = packed.train
    assert len(train) < len(train.ids) and 0.8 < train.efficiency <= 1.0
    assert sorted(i for r in range(len(train)) for i in train.samples(r)) == sorted(train.ids.tolist())
    batch = train.batch([0, 1])
    assert batch["input_ids"].shape == (2, 2048) and "position_ids" in batch
    assert int(batch["attention_mask"].sum()) == sum(len(train.pool[i]) for r in (0, 1) for i in train.samples(r))
    assert packed.fingerprint["sha256"] != plain.fingerprint["sha256"]  # the rows are part of what resumes
    weighted = load_run_data(
        data_cfg(**{**cfg, "datasets": [{"path": str(PEER_DATA / "identity.json"), "format": "alpaca", "weight": 2}]}),
        st,
        collator,
        seed=0,
    )
    assert len(weighted.train.ids) == 182
    held = load_run_data(data_cfg(**cfg, eval_ratio=0.1), st, collator, seed=0)
    assert len(held.train.ids) + len(held.eval) == 391 - failed and len(held.eval) == round(0.1 * (391 - failed))
    assert any("types of all tokens" in line for line in plain.summary_lines())
    assert plain.metrics()["datasets"]["identity"]["records"] == 91


def test_train_on_last_through_truncation_packing_and_the_report(tmp_path, tokenizer):
    """data.train_on=last on LLaMA-Factory's multi-turn tool-use demo, truncated to a short cutoff and packed: each
    sample trains one run of tokens, its last reply's (every assistant reply trains under train_on=assistant, with
    the same tokens), the packed rows carry exactly those labels, and the report counts them per sample."""
    info = str(PEER_DATA / "dataset_info.json")
    cfg = dict(dataset_info=info, datasets=["glaive_toolcall_en_demo"], cache_dir=str(tmp_path / "c"))
    cfg.update(cutoff_len=768, on_error="skip")
    runs = {}
    for train_on in ("assistant", "last"):
        st = SemanticTokenizer(tokenizer, train_on=train_on)
        runs[train_on] = load_run_data(data_cfg(**cfg, train_on=train_on), st, SemanticCollator.from_tokenizer(st), 0)
    every, last = runs["assistant"], runs["last"]
    assert every.reports["glaive_toolcall_en_demo"].truncation.truncated > 0
    assert len(last.train.ids) == len(every.train.ids) > 250
    counts, more = [], 0
    for i in last.train.ids:
        mine, theirs = last.train.pool[int(i)].features, every.train.pool[int(i)].features
        assert np.array_equal(mine["input_ids"], theirs["input_ids"])
        trained = np.flatnonzero(mine["labels"] != -100)
        assert len(trained) and np.array_equal(trained, np.arange(trained[0], trained[-1] + 1))  # one run
        assert tokenizer.decode(mine["input_ids"][trained[-2:]].tolist()) == "<|im_end|>\n"
        theirs_trained = np.flatnonzero(theirs["labels"] != -100)
        assert np.array_equal(theirs_trained[-len(trained) :], trained)  # the last of assistant's runs
        more += len(theirs_trained) > len(trained)
        counts.append(len(trained))
    assert more > 100  # most of the demo's conversations have several replies
    report = last.metrics()["datasets"]["glaive_toolcall_en_demo"]["trained_tokens_per_sample"]
    assert report["samples"] == len(counts) and report["tokens"] == sum(counts)
    assert (report["min"], report["max"]) == (min(counts), max(counts))
    line = next(line for line in last.summary_lines() if "glaive_toolcall_en_demo" in line)
    assert f"trained tokens per sample: mean {sum(counts) / len(counts):.1f} ({min(counts)}-{max(counts)})" in line

    st = SemanticTokenizer(tokenizer, train_on="last")
    packed = load_run_data(data_cfg(**cfg, train_on="last", packing=True), st, SemanticCollator.from_tokenizer(st), 0)
    train = packed.train
    assert len(train) < len(train.ids)
    by_id = dict(zip(last.train.ids.tolist(), counts))
    for r in range(3):
        batch = train.batch([r])
        assert int((batch["labels"] != -100).sum()) == sum(by_id[i] for i in train.samples(r))


def test_v1_sft_demo_parts_and_loss_weights_encode(tmp_path, tokenizer):
    """LLaMA-Factory's v1 layout (content parts with "value", per-message loss_weight that says what trains
    anyway): every record encodes, and what trains is the assistant content the loss weights point at."""
    st = SemanticTokenizer(tokenizer)
    built = prepare(spec_of(PEER_DATA / "v1_sft_demo.jsonl"), st, Preprocess(cutoff_len=4096), tmp_path / "c")
    assert len(built.samples) == 500 and not built.reports.load.skipped
    first = json.loads((PEER_DATA / "v1_sft_demo.jsonl").read_text().splitlines()[0])
    reply = first["messages"][1]["content"][0]["value"]
    sample = built.samples[0]
    trained = sample.features["input_ids"][sample.features["labels"] != -100]
    assert tokenizer.decode(trained.tolist()).startswith(reply)


def test_a_noise_window_masks_old_noise_before_encoding(tmp_path, tokenizer):
    """data.noise_window: each sample is the encoding of its record with only the newest N noise turns
    (truncate.window_noise), counted in the report, under its own cache key."""
    from hsa_train.data.truncate import window_noise

    path = demo_subset(tmp_path / "a.jsonl", 6)
    st = SemanticTokenizer(tokenizer)
    full = prepare(spec_of(path), st, Preprocess(), tmp_path / "cache")
    masked = prepare(spec_of(path), st, Preprocess(noise_window=1), tmp_path / "cache")
    assert masked.key != full.key
    records = [json.loads(line) for line in path.read_text().splitlines()]
    expected_dropped = 0
    for record, sample in zip(records, masked.samples):
        kept, dropped = window_noise(record["messages"], 1)
        expected_dropped += dropped
        reference = st.encode_detailed([record["messages"][i] for i in kept]).features
        assert list(sample.features["input_ids"]) == reference["input_ids"]
    assert masked.reports.truncation.turns_masked == expected_dropped > 0
