"""stage=dpo end to end, as users run it: LLaMA-Factory's pairs through dataset_info.json, the demo preferences
learned beyond chance on held-out pairs, a LoRA run whose logged metrics are recomputed here from the exported
adapter and the base, exact resume, and DDP / FSDP2 against one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import BASE_ARCH, assert_ran, run_cli, run_in_process, run_torchrun

from hsa_train.config import bundled_path
from hsa_train.model.loading import build_model, load_tokenizer

TINY = ["model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2"]
LN2 = math.log(2)
DEFAULT_LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}


def pairs_subset(path: Path, start: int, n: int) -> Path:
    lines = Path(bundled_path("demo/preferences.jsonl")).read_text().splitlines()[start : start + n]
    path.write_text("\n".join(lines) + "\n")
    return path


def entry(path: Path) -> str:
    return f"[{{path:{path},ranking:true}}]"


def dpo(run_dir: Path, *args: str, nproc: int = 1, cli: bool = False, timeout: int = 600) -> dict:
    """A stage=dpo run: in this process, or from the command line (`cli`), or under torchrun (`nproc` > 1)."""
    base = ["stage=dpo", "data=dpo_demo", "logging.progress=none", *args]
    if nproc == 1 and not cli:
        return run_in_process(run_dir, *base)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    base.append(f"hydra.run.dir={run_dir}")
    if nproc == 1:
        proc = run_cli(*base, cwd=run_dir.parent, timeout=timeout)
    else:
        proc = run_torchrun(*base, cwd=run_dir.parent, nproc=nproc, timeout=timeout)
    assert_ran(proc)
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return pairs_subset(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 0, 24)


def test_dpo_trains_on_llamafactory_pairs_through_dataset_info(tmp_path, peer_data):
    metrics = dpo(
        tmp_path / "run",
        *TINY,
        f"data.dataset_info={peer_data / 'dataset_info.json'}",
        "data.datasets=[dpo_en_demo]",
        "data.overlong=drop",  # the demo's longest pairs do not fit the tiny cutoff: dropped, and counted
        "data.cutoff_len=384",
        "data.eval_ratio=0.1",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "train.eval_batch_size=4",
        cli=True,  # as a user runs it
    )
    counts = metrics["data"]["datasets"]["dpo_en_demo"]
    assert metrics["stage"] == "dpo" and counts["records"] + counts["truncation"]["dropped"] == 300
    assert metrics["samples_train"] + metrics["samples_eval"] == counts["records"]  # pairs, not sequences
    # the first step's policy is the reference: every implicit reward is 0, the loss log 2
    assert metrics["train_losses"][0] == pytest.approx(LN2, abs=1e-6)
    stats = metrics["train_stats"]
    assert set(stats) == {f"rewards/{k}" for k in ("chosen", "rejected", "accuracy", "margin")} | {
        "logps/chosen",
        "logps/rejected",
    }
    assert all(len(values) == 3 for values in stats.values())
    assert stats["rewards/margin"][0] == 0 and stats["rewards/accuracy"][0] == 0
    assert stats["logps/chosen"][0] < 0 and stats["logps/rejected"][0] < 0
    assert metrics["eval_pairs"] == metrics["samples_eval"] > 0
    assert metrics["eval_rewards"]["margin"] == pytest.approx(
        metrics["eval_rewards"]["chosen"] - metrics["eval_rewards"]["rejected"], abs=1e-5
    )


def test_dpo_on_the_demo_preferences_beats_chance_on_held_out_pairs(tmp_path):
    """The bundled demo's pairs (conf/data/dpo_demo.yaml), 60 of them held out: from the reference's 0 (every
    reward 0), held-out accuracy rises above one half and the loss below log 2."""
    from hsa_train.sweep import metric_value

    small_model = ["model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2"]
    metrics = dpo(tmp_path / "run", *small_model, "train.max_steps=40", "train.micro_batch_size=8")
    assert metrics["eval_pairs"] == 60 and metrics["samples_train"] == 540
    assert metrics["eval_rewards"]["accuracy"] > 0.55, metrics["eval_rewards"]
    assert metric_value(metrics, "eval_rewards.accuracy") == metrics["eval_rewards"]["accuracy"]  # a sweep objective
    assert metrics["eval_loss"] < LN2 - 0.05
    assert metrics["train_losses"][0] == pytest.approx(LN2, abs=1e-6)


# -- LoRA: the reference is the base with its adapters off; the logged metrics recomputed from the exports --------
ARCH = BASE_ARCH


def side_logp(model, features) -> float:
    """Summed log p of a sample's trained tokens, the sample alone, token by token."""
    ids, sem = (torch.tensor(features[k])[None] for k in ("input_ids", "semantic_ids"))
    with torch.no_grad():
        logits = model(input_ids=ids, semantic_ids=sem).logits[0].double()
    return sum(
        float(torch.log_softmax(logits[t - 1], -1)[label])
        for t, label in enumerate(features["labels"])
        if t > 0 and label != -100
    )


def test_lora_dpo_metrics_match_a_recomputation_from_the_exported_adapter_and_the_base(tmp_path, small):
    from hsa_train import enable_hsa
    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.pairs import encode_pair
    from hsa_train.model.export import load_exported

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    base = build_model(None, ARCH, tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    held = pairs_subset(tmp_path / "held.jsonl", 100, 6)
    beta = 0.5
    metrics = dpo(
        tmp_path / "run",
        f"model.name_or_path={tmp_path / 'base'}",
        "model.lora.enabled=true",
        "model.lora.dropout=0.0",
        "hsa.learnable=true",  # λ train beside the adapters; the reference keeps them at their start
        f"data.datasets={entry(small)}",
        f"data.eval_datasets={entry(held)}",
        "data.cutoff_len=null",  # whole trajectories: the recomputation below encodes them whole too
        f"stage.beta={beta}",
        "train.lr=0.01",
        "train.max_steps=4",
        "train.micro_batch_size=3",
        "train.eval_batch_size=4",  # 6 pairs: a full batch, then one of two
        "train.eval_every=2",  # training goes on after an evaluation (adapters back on, λ where they were)
    )
    assert metrics["train_losses"][0] == pytest.approx(LN2, abs=1e-6)
    policy = load_exported(tmp_path / "run" / "adapter").eval()
    # the run's start: the base with the bias at the configured λ (the run's conf/hsa/default.yaml)
    reference = enable_hsa(build_model(str(tmp_path / "base"), None, tokenizer), lambdas=DEFAULT_LAMBDAS).eval()
    st = SemanticTokenizer(tokenizer)
    losses, accurate, margins = [], [], []
    for line in held.read_text().splitlines():
        row = json.loads(line)
        prompt = row["messages"]
        (c, r), _, _ = encode_pair(
            st.encode_detailed, prompt + [row["chosen"]], prompt + [row["rejected"]], len(prompt), None, None, {}
        )
        rewards = [beta * (side_logp(policy, s.features) - side_logp(reference, s.features)) for s in (c, r)]
        margin = rewards[0] - rewards[1]
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
        accurate.append(margin > 0)
        margins.append(margin)
    # float32 log-probs summed over ~700 tokens, batched and padded there, alone here: ~1e-4 apart (the reference
    # without the bias, say, is 1e-2 off)
    assert metrics["eval_pairs"] == 6
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 6, abs=5e-4)
    assert metrics["eval_rewards"]["margin"] == pytest.approx(sum(margins) / 6, abs=1e-3)
    assert metrics["eval_rewards"]["accuracy"] == pytest.approx(sum(accurate) / 6)
    assert any(abs(m) > 1e-3 for m in margins)  # the adapter did move the policy away from the base


def test_dpo_resumes_exactly_with_the_reference_at_the_start(tmp_path, small):
    """The frozen reference is the starting model, not the checkpoint a resumed run loads."""
    args = [*TINY, f"data.datasets={entry(small)}", "data.eval_ratio=0.25", "train.micro_batch_size=2"]
    whole = dpo(tmp_path / "whole", *args, "train.max_steps=6", "train.save_every=3", "train.keep_last=null")
    mid = tmp_path / "whole" / "checkpoints" / "step_0000003"
    resumed = dpo(tmp_path / "resumed", *args, "train.max_steps=6", f"train.resume={mid}")
    assert resumed["resumed_from"] == str(mid)
    assert resumed["train_losses"] == whole["train_losses"]
    assert resumed["train_stats"] == whole["train_stats"]
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-9)
    assert resumed["eval_rewards"] == pytest.approx(whole["eval_rewards"], abs=1e-9)


def test_a_precomputed_reference_trains_as_the_live_one_and_is_cached_by_the_starting_model(tmp_path, small):
    more = pairs_subset(tmp_path / "more.jsonl", 200, 5)
    args = [*TINY, f"data.datasets={entry(small)}", "data.eval_ratio=0.25", "train.micro_batch_size=2"]
    args += ["train.max_steps=4", "hsa.learnable=true", f"+data.eval_sets.more={entry(more)}"]
    live = dpo(tmp_path / "live", *args)
    first = dpo(tmp_path / "first", *args, "stage.precompute_reference=true")
    again = dpo(tmp_path / "again", *args, "stage.precompute_reference=true")
    other = dpo(tmp_path / "other", *args, "stage.precompute_reference=true", "hsa.lambdas.PROCESS_NOISE=0.3")
    assert live["reference"] == {"kind": "frozen_copy"}
    assert [r["reference"] for r in (first, again, other)] == [
        {"kind": "precomputed", "from_cache": False},
        {"kind": "precomputed", "from_cache": True},
        {"kind": "precomputed", "from_cache": False},  # other λ: another starting model, other log-probs
    ]
    for run in (first, again):  # the same numbers as a reference run beside the policy (batched differently)
        assert run["train_losses"] == pytest.approx(live["train_losses"], abs=1e-5)
        assert run["eval_loss"] == pytest.approx(live["eval_loss"], abs=1e-5)
        assert run["eval_rewards"] == pytest.approx(live["eval_rewards"], abs=1e-5)
        assert run["eval_sets"]["more"]["pairs"] == 5  # an eval set's pairs have their own table
        assert run["eval_sets"]["more"]["rewards"] == pytest.approx(live["eval_sets"]["more"]["rewards"], abs=1e-5)
    assert other["train_stats"]["logps/chosen"][0] != pytest.approx(live["train_stats"]["logps/chosen"][0], abs=1e-3)


# -- many processes: DDP and FSDP2 give the one-process step and evaluation ---------------------------------------
DIST = [*TINY, "data.eval_ratio=0.2", "train.eval_batch_size=2", "train.max_steps=4", "hsa.learnable=true"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, small) -> dict:
    """5 held-out pairs in batches of 2 over 2 ranks: 3 and 2 pairs, 2 forwards each, the second of one a filler."""
    return dpo(
        tmp_path_factory.mktemp("single") / "run", *DIST, f"data.datasets={entry(small)}", "train.micro_batch_size=4"
    )


def assert_same_run(run: dict, ref: dict) -> None:
    """The same steps, statistics, evaluation (KTO's baseline too) and λ as `ref`, 5 held out (test_kto's too)."""
    assert run["samples_eval"] == ref["samples_eval"] == 5
    for a, b in zip(run["train_losses"], ref["train_losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    for name, values in ref["train_stats"].items():
        assert run["train_stats"][name] == pytest.approx(values, abs=1e-4), name
    assert run["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    if "eval_kl" in ref:
        assert run["eval_kl"] == pytest.approx(ref["eval_kl"], abs=1e-4)
    assert run["eval_rewards"] == pytest.approx(ref["eval_rewards"], abs=1e-4)
    assert run["hsa_learned"] == pytest.approx(ref["hsa_learned"], abs=1e-6)


@pytest.mark.parametrize(
    "mode, split",
    [("ddp", ["train.micro_batch_size=1", "train.grad_accum=2"]), ("fsdp", ["train.micro_batch_size=2"])],
)
def test_dpo_under_two_ranks_matches_one_process(tmp_path, small, single, mode, split):
    run = dpo(tmp_path / mode, *DIST, f"data.datasets={entry(small)}", *split, f"train.distributed={mode}", nproc=2)
    assert run["world_size"] == 2 and run["distributed"] == mode
    assert_same_run(run, single)


def test_a_reference_precomputed_over_two_ranks_matches_one_process(tmp_path, small, single):
    """Each rank computes every other pair's reference log-probs, then they share them."""
    run = dpo(
        tmp_path / "fsdp", *DIST, f"data.datasets={entry(small)}", "train.micro_batch_size=2",
        "train.distributed=fsdp", "stage.precompute_reference=true", "data.cache=false", nproc=2,
    )  # fmt: skip
    assert run["reference"] == {"kind": "precomputed", "from_cache": False} and run["world_size"] == 2
    assert_same_run(run, single)
