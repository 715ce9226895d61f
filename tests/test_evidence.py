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


def test_a_tasks_own_settings_reach_its_jobs_and_later_settings_win():
    from hydra import compose, initialize_config_module

    def composed(extra):
        overrides = evidence.job_overrides(evidence.TASKS["agent"], "plain", 1, extra, None)
        with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    full = composed([])
    assert (full.model.arch.num_hidden_layers, full.train.max_steps) == (2, 200)  # the agent's CPU budget
    assert full.hsa.enabled is False and full.eval.rollout.episodes == 0  # the arm; episodes are measured by the script
    quick = composed(list(evidence.QUICK))  # --quick's extras come after the task's: its 1 layer and 4 steps win
    assert (quick.model.arch.num_hidden_layers, quick.train.max_steps) == (1, 4)


def test_answer_kind_tells_the_door_lost_from_the_latest_missed():
    codes = {"red": [11, 12], "blue": [13]}  # red had code 11, then 12; blue 13
    assert evidence.answer_kind(12, 12, "red", codes) == "right"
    assert evidence.answer_kind(11, 12, "red", codes) == "older code, same door"
    assert evidence.answer_kind(13, 12, "red", codes) == "another door's code"
    assert evidence.answer_kind(11, 13, "blue", codes) == "another door's code"
    assert evidence.answer_kind(19, 13, "blue", codes) == "no code of the trajectory"


def test_summary_counts_answer_kinds_only_where_recorded():
    kinds = ["right", "another door's code", "right", "older code, same door"]
    with_kinds = []
    for s in (1, 2):
        r = record("plain", s, [1, 0, 1, 0], [50, 150, 250, 900])
        r["lengths"]["1x"]["kind"] = kinds
        with_kinds.append(r)
    summary = evidence.summarize({"mqar": {"records": {"plain": with_kinds}}}, reps=20)["mqar"]["arms"]["plain"]
    assert summary["answers_1x"] == {"right": 4, "older code, same door": 2, "another door's code": 2,
                                     "no code of the trajectory": 0}  # fmt: skip
    older = [record("plain", s, [1, 0, 1, 0], [50, 150, 250, 900]) for s in (1, 2)]  # runs recorded before kinds
    assert (
        "answers_1x"
        not in evidence.summarize({"mqar": {"records": {"plain": older}}}, reps=20)["mqar"]["arms"]["plain"]
    )


def test_choice_accuracy_counts_only_the_episodes_that_chose():
    def run(seed, outcome, events=None):
        events = events or [1] * len(outcome)
        lengths = {
            n: {"correct": [int(o == "right") for o in outcome], "outcome": outcome, "key_events": events}
            for n in evidence.LENGTHS
        }
        return {"seed": seed, "lengths": lengths}

    runs = [
        run(1, ["right", "none", "wrong", "right"], [1, 1, 0, 2]),
        run(2, ["none", "none", "right", "wrong"]),
        run(3, ["none"]),
    ]
    cell = evidence.choice_accuracy(runs, "2x", 300, np.random.default_rng(0))
    assert (cell["chose"], cell["episodes"]) == (5, 9)  # seed 3 never chose: it has no share to resample
    assert cell["mean"] == pytest.approx(reference_point([[1, 0, 1], [1, 0]]))
    assert 0.0 <= cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1] <= 1.0
    seen = evidence.choice_accuracy(runs, "2x", 300, np.random.default_rng(0), after_event=True)
    assert seen["chose"] == 4 and seen["mean"] == pytest.approx(
        reference_point([[1, 1], [1, 0]])
    )  # seed 1's wrong one saw none
    assert "mean" not in evidence.choice_accuracy([run(1, ["none", "none"])], "1x", 10, np.random.default_rng(0))
