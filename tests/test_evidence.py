"""benchmarks/evidence.py's statistics and benchmarks/induction_base.py's base, against references written here.
(The whole --quick run is in test_benchmarks.py.)"""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import evidence  # noqa: E402
import induction_base  # noqa: E402


def test_copy_batch_labels_exactly_a_repeat_of_an_earlier_stretch():
    ids, labels = induction_base.copy_batch(random.Random(3), list(range(5, 500)), 64, 48)
    assert ids.shape == labels.shape == (64, 48)
    offsets = set()
    for x, y in zip(ids.tolist(), labels.tolist()):
        scored = [i for i, v in enumerate(y) if v != -100]
        assert scored == list(range(scored[0], scored[-1] + 1)) and len(scored) >= 10  # one run of positions
        assert all(y[i] == x[i] for i in scored)
        # some offset d makes every scored token (and the one before the run) a copy of the token d back
        run = range(scored[0] - 1, scored[-1] + 1)
        found = [d for d in range(len(run), scored[0]) if all(x[i] == x[i - d] for i in run)]
        assert found, "no earlier stretch repeats"
        offsets.add(found[0])
    assert len(offsets) > 5  # the offset varies: only content, not position, tells where the copy comes from


def test_build_base_writes_a_checkpoint_the_cli_loads(tmp_path):
    from hsa_train.model.loading import load_pretrained, load_tokenizer

    arch = {**induction_base.ARCH, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    record = induction_base.build_base(tmp_path / "base", seed=0, arch=arch, max_steps=3, target=2.0, check_every=3)
    assert record["steps"] == 3 and 0.0 <= record["copy_accuracy"] <= 1.0
    model = load_pretrained(str(tmp_path / "base"))
    tokenizer = load_tokenizer(str(tmp_path / "base"), config=model.config)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id and tokenizer.chat_template
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def reference_point(per_seed):
    return float(np.mean([np.mean(v) for v in per_seed]))


def test_bootstrap_point_and_interval():
    rng = np.random.default_rng(0)
    per_seed = [np.array([1, 0, 1, 1]), np.array([0, 0, 1, 0]), np.array([1, 1, 1, 1])]
    mean, low, high = evidence.bootstrap(per_seed, 500, rng)
    assert mean == pytest.approx(reference_point(per_seed))
    assert 0.0 <= low < mean < high <= 1.0
    same = [np.ones(10), np.ones(7)]  # no spread: the interval is the point
    assert evidence.bootstrap(same, 50, rng) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_is_the_difference_item_by_item():
    rng = np.random.default_rng(1)
    base = [np.array([0, 1, 0, 1, 1]), np.array([1, 1, 0, 0, 0])]
    better = [np.ones(5), np.ones(5)]
    diff, low, high = evidence.bootstrap(better, 400, rng, paired=base)
    assert diff == pytest.approx(1 - reference_point(base)) and low > 0  # never worse on any item: significant
    assert evidence.bootstrap(base, 50, rng, paired=base) == (0.0, 0.0, 0.0)


def record(arm, seed, correct, gaps):
    lengths = {n: {"correct": correct, "gap": gaps, "context": [100]} for n in evidence.LENGTHS}
    return {"arm": arm, "seed": seed, "tokens_per_s": 100.0 if arm == "plain" else 50.0, "lengths": lengths,
            "types": ["GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"], "lambdas_per_head": None}  # fmt: skip


def test_summary_marks_significance_only_when_the_interval_excludes_zero():
    records = {
        "plain": [record("plain", s, [0, 0, 1, 0] * 5, [50, 150, 250, 900] * 5) for s in (1, 2, 3)],
        "hsa": [record("hsa", s, [1, 1, 1, 1] * 5, [50, 150, 250, 900] * 5) for s in (1, 2, 3)],
        "obs_mask": [record("obs_mask", s, [0, 0, 1, 0] * 5, [50, 150, 250, 900] * 5) for s in (1, 2, 3)],
    }
    summary = evidence.summarize({"mqar": {"records": records}}, reps=200)["mqar"]["arms"]
    cell = summary["hsa"]["lengths"]["4x"]
    assert cell["mean"] == 1.0 and cell["vs_plain"]["diff"] == pytest.approx(0.75) and cell["vs_plain"]["significant"]
    same = summary["obs_mask"]["lengths"]["1x"]["vs_plain"]
    assert same["diff"] == 0.0 and not same["significant"]
    assert summary["hsa"]["speed_vs_plain"] == 0.5
    assert (summary["hsa"]["learned"], summary["plain"]["learned"]) == (3, 0)  # 100% and 25% at 1x
    gaps = {tuple(r["gap"]): r["accuracy"] for r in summary["plain"]["by_gap"]}  # the third item (gap 250) is right
    assert gaps == {(0, 100): 0.0, (100, 200): 0.0, (200, 400): 1.0, (800, 1600): 0.0}
