"""stage=kto: labelled samples and their KL samples, against references written here: TRL's formula
(KTOTrainer.kto_loss) on the same numbers, a step recomputed sample by sample with log-probs summed token by token,
the KL samples encoded by hand; and the runs: LLaMA-Factory's kto_en_demo from the command line, the demo's own
labelled answers, two ranks against one process, a precomputed reference against the live one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BASE_ARCH, assert_ran, run_in_process, run_torchrun
from test_config import composed
from test_dpo import assert_same_run
from test_preference import row_logp

from hsa_train.config import ConfigError, bundled_path, validate
from hsa_train.data.spec import resolve_datasets
from hsa_train.training.kto import KTOLoss, kto_loss
from hsa_train.types import SemanticTypes

TYPES = SemanticTypes()
TINY = ["model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2"]
STAT_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen"}
STAT_NAMES |= {"logps/rejected", "count/chosen", "count/rejected", "kl"}


def trl_kto_loss(policy_chosen, policy_rejected, policy_kl, ref_chosen, ref_rejected, ref_kl, beta, wd, wu):
    """TRL's KTOTrainer.kto_loss (loss_type "kto"), written out: the KL baseline the clamped mean of the KL samples'
    log-ratio, no gradient; the losses of the desirable samples, then of the undesirable ones, weighted; their mean."""
    kl = (policy_kl - ref_kl).mean().clamp(min=0).detach()
    chosen_losses = 1 - F.sigmoid(beta * ((policy_chosen - ref_chosen) - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - (policy_rejected - ref_rejected)))
    losses = torch.cat((wd * chosen_losses, wu * rejected_losses), 0)
    return losses.mean(), beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_the_loss_rewards_and_gradients_match_trl(beta, wd, wu):
    torch.manual_seed(0)
    policy = (torch.randn(7) * 3).requires_grad_()
    reference = torch.randn(7) * 3
    desirable = torch.tensor([True, False, True, True, False, False, True])
    kl_policy, kl_ref = torch.randn(5), torch.randn(5) - 1.0  # a positive mean drift: the clamp does not bite
    kl = max(float((kl_policy - kl_ref).mean()), 0.0)
    assert kl > 0
    terms = kto_loss(policy, reference, desirable, kl, beta, wd, wu)
    (terms.losses.sum() / 7).backward()
    ours = policy.grad.clone()
    policy.grad = None
    d, u = desirable, ~desirable
    want, chosen_rewards, rejected_rewards = trl_kto_loss(
        policy[d], policy[u], kl_policy, reference[d], reference[u], kl_ref, beta, wd, wu
    )
    want.backward()
    assert float(terms.losses.detach().sum() / 7) == pytest.approx(float(want.detach()), rel=1e-6)
    torch.testing.assert_close(ours, policy.grad)
    torch.testing.assert_close(terms.rewards[d], chosen_rewards)
    torch.testing.assert_close(terms.rewards[u], rejected_rewards)
    # known values: at the reference with no drift every loss is w (1 - σ(0)) = w / 2
    zero = torch.zeros(2)
    at_start = kto_loss(zero, zero, torch.tensor([True, False]), 0.0, beta, wd, wu).losses
    torch.testing.assert_close(at_start, torch.tensor([wd / 2, wu / 2]))


# -- data: a labelled sample and its KL sample, its prompt with the next record's completion -----------------------
RECORDS = [
    {
        "messages": [
            {"role": "system", "content": "Task: fetch the mug.", "semantic_type": "GLOBAL_CONDITION"},
            {"role": "user", "content": "Obs: a kitchen.", "semantic_type": "PROCESS_NOISE"},
            {"role": "assistant", "content": "Action: open the cupboard."},
        ],
        "label": True,
    },
    {
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Five."},
        ],
        "label": False,
    },
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello there, friend."},
        ],
        "label": True,
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def labelled_entry(path: Path) -> dict:
    return {"path": str(path), "columns": {"kto_tag": "label"}}


def prepared(tmp_path, entry, tokenizer, dataset_info=None, **pre):
    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.prepare import Preprocess, prepare

    [spec] = resolve_datasets([entry], dataset_info, TYPES)
    return prepare(spec, SemanticTokenizer(tokenizer), Preprocess(**pre), tmp_path / "cache")


def by_hand(tokenizer, messages: list[dict], prompt_len: int) -> dict:
    """A conversation encoded whole, its first `prompt_len` messages' tokens untrained."""
    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.pairs import continuation_only

    st = SemanticTokenizer(tokenizer)
    plain = [{k: v for k, v in m.items()} for m in messages]
    for m in plain:
        m.setdefault("semantic_type", None)
    return continuation_only(st.encode_detailed(plain, None), prompt_len).features


def test_each_labelled_record_brings_a_kl_sample_with_the_next_records_completion(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "k.jsonl", RECORDS)
    built = prepared(tmp_path, labelled_entry(path), tokenizer)
    samples = built.samples
    assert len(samples) == 6 and built.reports.load.kept == 3
    assert built.reports.trained.samples == 3  # the KL samples are no data of their own
    for k, record in enumerate(RECORDS):
        sample, kl = samples[2 * k], samples[2 * k + 1]
        assert sample.desirable is record["label"] and kl.desirable is None
        assert sample.where == kl.where == f"{path}:{k + 1}"
        partner = RECORDS[(k + 1) % 3]  # the last record's partner is the first
        prompt = record["messages"][:-1]
        for got, messages in ((sample, record["messages"]), (kl, [*prompt, partner["messages"][-1]])):
            want = by_hand(tokenizer, messages, len(prompt))
            for name in ("input_ids", "labels", "semantic_ids"):
                assert np.array_equal(got.features[name], want[name]), (k, name)
        trained = kl.features["input_ids"][kl.features["labels"] != -100].tolist()
        assert tokenizer.decode(trained) == partner["messages"][-1]["content"] + "<|im_end|>\n"


def test_kto_en_demo_reads_through_dataset_info(tmp_path, tokenizer, peer_data):
    raw = json.loads((peer_data / "kto_en_demo.json").read_text())
    info = str(peer_data / "dataset_info.json")
    built = prepared(tmp_path, "kto_en_demo", tokenizer, dataset_info=info, cutoff_len=1024, overlong="drop")
    dropped = built.reports.truncation.dropped
    assert built.reports.load.kept + dropped == len(raw) == 300
    labels = [built.samples[2 * k].desirable for k in range(len(built.samples) // 2)]
    assert set(labels) == {True, False} and len(labels) == built.reports.load.kept
    if not dropped:
        assert labels == [row["label"] for row in raw]


def test_an_alpaca_dataset_can_carry_labels(tmp_path, tokenizer):
    rows = [
        {"instruction": "Add two and two.", "output": "Four.", "label": True},
        {"instruction": "Name a colour.", "input": "One word.", "output": "Seven.", "label": False},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    entry = {"path": str(path), "format": "alpaca", "columns": {"kto_tag": "label"}}
    samples = prepared(tmp_path, entry, tokenizer).samples
    assert [samples[0].desirable, samples[2].desirable] == [True, False]
    kl = samples[1].features
    assert tokenizer.decode(kl["input_ids"][kl["labels"] != -100].tolist()) == "Seven.<|im_end|>\n"


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{**RECORDS[0], "label": "yes"}, RECORDS[1]], "k.jsonl:1: malformed label: 'label' is 'yes'; give true"),
        ([{"messages": RECORDS[0]["messages"]}, RECORDS[1]], "k.jsonl:1: missing column: no label 'label'"),
        (
            [{"messages": RECORDS[1]["messages"][:1], "label": True}, RECORDS[1]],
            "k.jsonl:1: nothing to label: a labelled record ends with the assistant's completion",
        ),
        ([RECORDS[0]], "k.jsonl:1: a labelled dataset \\(KTO\\) needs two records or more"),
    ],
)
def test_bad_labelled_records_are_refused_with_their_place(tmp_path, tokenizer, rows, match):
    from hsa_train.data.loader import DataError

    path = write_jsonl(tmp_path / "k.jsonl", rows)
    with pytest.raises(DataError, match=match):
        prepared(tmp_path, labelled_entry(path), tokenizer)


def test_a_kl_sample_that_cannot_fit_names_its_partner(tmp_path, tokenizer):
    long = {"role": "assistant", "content": "word " * 200}
    rows = [RECORDS[1], {"messages": [{"role": "user", "content": "Talk."}, long], "label": True}]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    with pytest.raises(ValueError, match=r"k.jsonl:1: .*\(with its KL sample: its prompt and the completion of .*k"):
        prepared(tmp_path, labelled_entry(path), tokenizer, cutoff_len=100, overlong="error")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stage=kto"], "data: trajectories holds conversations, and stage=kto trains on labelled samples: name a"),
        (["stage=dpo", "data=kto_demo"], "data: demo_labelled holds labelled samples, and stage=dpo trains on pref"),
        (["data=kto_demo"], r"data: demo_labelled holds labelled samples \(columns.kto_tag\), and stage=sft trains"),
        (["stage=kto", "data=kto_demo", "stage.undesirable_weight=0"], "stage.undesirable_weight=0.0 must be a pos"),
        (["stage=kto", "data=kto_demo", "+stage.loss=ipo"], "stage.loss applies to stage=dpo; this run is stage=kto"),
        (["stage=dpo", "data=dpo_demo", "+stage.desirable_weight=2"], "stage.desirable_weight applies to stage=kto;"),
        (["stage=kto", "data=kto_demo", "data.packing=true"], "data.packing=true does not apply to stage=kto"),
    ],
)
def test_kto_configs_are_checked_before_the_model_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(composed(*overrides))


def test_ranking_and_a_label_column_are_one_or_the_other():
    with pytest.raises(ValueError, match="a dataset is preference pairs or labelled samples"):
        resolve_datasets([{"path": "x.jsonl", "ranking": True, "columns": {"kto_tag": "label"}}], None, TYPES)


# -- the objective on a real model: the KL baseline of the whole step, however the step is split -------------------
@pytest.mark.parametrize("clamped", [False, True])
def test_the_kto_step_matches_sample_by_sample_forwards_and_trl(tmp_path, tokenizer, model_factory, clone, clamped):
    """Two drifts: the KL samples' mean log-ratio positive (the baseline), and negative (clamped to 0)."""
    from hsa_train import enable_hsa
    from hsa_train.data import SemanticCollator
    from hsa_train.data.dataset import pair_batch
    from hsa_train.training.preference import frozen_copy
    from hsa_train.training.step import accumulate_gradients, make_forward

    samples = prepared(tmp_path, labelled_entry(write_jsonl(tmp_path / "k.jsonl", RECORDS)), tokenizer).samples
    twos = [(samples[2 * k], samples[2 * k + 1]) for k in range(3)]
    base = enable_hsa(model_factory(vocab_size=len(tokenizer)), lambdas={"PROCESS_NOISE": 0.2})
    reference_model = clone(base).eval()
    policy = clone(base)
    torch.manual_seed(0)
    with torch.no_grad():  # the policy has drifted from the reference: noise makes every text less likely
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if not clamped:  # ... unless it has learnt the KL samples' completions
        sgd = torch.optim.SGD(policy.parameters(), lr=0.02)
        for _ in range(10):
            sgd.zero_grad()
            (-sum(row_logp(policy, kl.features) for _, kl in twos)).backward()
            sgd.step()
        policy.zero_grad(set_to_none=True)
    beta, wd, wu, cpu = 0.5, 1.2, 0.9, torch.device("cpu")
    collate = SemanticCollator(pad_token_id=0)
    results = []
    for groups in ([[0, 1, 2]], [[0], [1, 2]], [[2], [0, 1]]):
        model = clone(policy)
        forward = make_forward(model, cpu, None, True)
        objective = KTOLoss(frozen_copy(make_forward(reference_model, cpu, None, True)), beta, wd, wu)
        batches = [pair_batch(collate, [twos[i] for i in g]) for g in groups]
        objective.begin(forward, batches, lambda values: values)  # one process: the sum over ranks is its own
        value, _, stats = accumulate_gradients(forward, batches, 3, objective=objective)
        results.append((value, objective.kl, objective.means(stats, 3), [p.grad.clone() for p in model.parameters()]))
    # the reference computation: every sample alone, token by token, then TRL's formula
    model = clone(policy)
    logp = [row_logp(model, s.features) for s, _ in twos]
    with torch.no_grad():
        ref = [row_logp(reference_model, s.features) for s, _ in twos]
        kl_policy = torch.stack([row_logp(model, kl.features) for _, kl in twos])
        kl_ref = torch.stack([row_logp(reference_model, kl.features) for _, kl in twos])
    d, u = [0, 2], [1]
    want, chosen_rewards, rejected_rewards = trl_kto_loss(
        torch.stack([logp[i] for i in d]), torch.stack([logp[i] for i in u]), kl_policy,
        torch.stack([ref[i] for i in d]), torch.stack([ref[i] for i in u]), kl_ref, beta, wd, wu,
    )  # fmt: skip
    want.backward()
    drift = float((kl_policy - kl_ref).mean())
    assert (drift < 0) if clamped else (drift > 0.01)
    kl = max(drift, 0.0)
    threshold = beta * kl
    right = sum(float(r) > threshold for r in chosen_rewards) + sum(float(r) < threshold for r in rejected_rewards)
    for value, got_kl, stats, grads in results:
        assert got_kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert value == pytest.approx(float(want.detach()), rel=1e-5)
        assert stats["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-4)
        assert stats["rewards/rejected"] == pytest.approx(float(rejected_rewards.mean()), rel=1e-4)
        margin = float(chosen_rewards.mean() - rejected_rewards.mean())
        assert stats["rewards/margin"] == pytest.approx(margin, rel=1e-4)
        assert stats["rewards/accuracy"] == pytest.approx(right / 3)
        assert (stats["count/chosen"], stats["count/rejected"]) == (2, 1)
        assert stats["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        for g, r in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(g, r, atol=2e-6, rtol=1e-4)


def test_a_step_of_one_class_reports_the_other_as_absent():
    objective = KTOLoss(None, 0.1)
    sums = [2.0, 0.0, 1.0, -20.0, 0.0, 2.0, 0.0, 0.6]  # two desirable samples, no undesirable one
    stats = objective.means(sums, 2)
    assert stats["rewards/chosen"] == 1.0 and stats["rewards/rejected"] is None and stats["rewards/margin"] is None
    assert stats["logps/rejected"] is None and stats["kl"] == pytest.approx(0.3)


# -- runs ------------------------------------------------------------------------------------------------------------
def kto(run_dir: Path, *args: str, nproc: int = 1, timeout: int = 600) -> dict:
    """A stage=kto run: in this process (the CLI's compose, validate and train), or under torchrun (`nproc` > 1)."""
    base = ["stage=kto", "data=kto_demo", "logging.progress=none", *args]
    if nproc == 1:
        return run_in_process(run_dir, *base)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    assert_ran(run_torchrun(*base, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, nproc=nproc, timeout=timeout))
    return json.loads((run_dir / "metrics.json").read_text())


def test_kto_trains_on_kto_en_demo_through_dataset_info(tmp_path, peer_data):
    metrics = kto(
        tmp_path / "run", *TINY, f"data.dataset_info={peer_data / 'dataset_info.json'}", "data.datasets=[kto_en_demo]",
        "data.overlong=drop", "data.cutoff_len=384", "data.eval_ratio=0.1", "train.max_steps=3",
        "train.micro_batch_size=2", "train.eval_batch_size=4",
    )  # fmt: skip
    counts = metrics["data"]["datasets"]["kto_en_demo"]
    assert metrics["stage"] == "kto" and counts["records"] + counts["truncation"]["dropped"] == 300
    assert metrics["samples_train"] + metrics["samples_eval"] == counts["records"]  # labelled samples, not rows
    assert counts["trained_tokens_per_sample"]["samples"] == counts["records"]
    assert metrics["train_losses"][0] == pytest.approx(0.5, abs=1e-6)  # at the reference: w (1 - σ(0)) each
    stats = metrics["train_stats"]
    assert set(stats) == STAT_NAMES and all(len(v) == 3 for v in stats.values())
    assert stats["kl"][0] == 0 and stats["rewards/accuracy"][0] == 0  # no drift, no reward yet
    assert metrics["eval_samples"] == metrics["samples_eval"] > 0
    assert sum(metrics["eval_count"].values()) == metrics["eval_samples"]
    assert metrics["eval_kl"] >= 0 and math.isfinite(metrics["eval_loss"])
    assert metrics["reference"] == {"kind": "frozen_copy"}


SMALL = 24


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    lines = Path(bundled_path("demo/labelled.jsonl")).read_text().splitlines()[:SMALL]
    path = tmp_path_factory.mktemp("labelled") / "labelled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def entry(path: Path) -> str:
    return f"[{{path:{path},columns:{{kto_tag:label}}}}]"


DIST = [*TINY, "data.eval_ratio=0.2", "train.eval_batch_size=2", "train.max_steps=4", "hsa.learnable=true"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, small) -> dict:
    """5 held-out samples in batches of 2 over 2 ranks: 3 and 2, 2 forwards each, the second of one a filler."""
    return kto(
        tmp_path_factory.mktemp("single") / "run", *DIST, f"data.datasets={entry(small)}", "train.micro_batch_size=4"
    )


def test_the_kl_baseline_drives_the_loss_once_the_policy_drifts(single):
    assert max(single["train_stats"]["kl"][1:]) > 0  # the later steps have a baseline to beat
    assert single["eval_kl"] > 0


@pytest.mark.parametrize(
    "mode, split",
    [("ddp", ["train.micro_batch_size=1", "train.grad_accum=2"]), ("fsdp", ["train.micro_batch_size=2"])],
)
def test_kto_under_two_ranks_matches_one_process(tmp_path, small, single, mode, split):
    """The KL baseline is the whole step's (both ranks, every micro-batch), so the split changes nothing."""
    run = kto(tmp_path / mode, *DIST, f"data.datasets={entry(small)}", *split, f"train.distributed={mode}", nproc=2)
    assert run["world_size"] == 2 and run["distributed"] == mode
    assert_same_run(run, single)


def test_a_precomputed_kto_reference_trains_as_the_live_one(tmp_path, small, single):
    run = kto(tmp_path / "pre", *DIST, f"data.datasets={entry(small)}", "train.micro_batch_size=2",
              "train.grad_accum=2", "stage.precompute_reference=true")  # fmt: skip
    assert run["reference"] == {"kind": "precomputed", "from_cache": False}
    assert_same_run(run, single)


def test_kto_resumes_exactly(tmp_path, small):
    args = [*TINY, f"data.datasets={entry(small)}", "data.eval_ratio=0.25", "train.micro_batch_size=2"]
    whole = kto(tmp_path / "whole", *args, "train.max_steps=6", "train.save_every=3", "train.keep_last=null")
    mid = tmp_path / "whole" / "checkpoints" / "step_0000003"
    resumed = kto(tmp_path / "resumed", *args, "train.max_steps=6", f"train.resume={mid}")
    assert resumed["resumed_from"] == str(mid)
    assert resumed["train_losses"] == whole["train_losses"]
    assert resumed["train_stats"] == whole["train_stats"]
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-9)


def test_lora_kto_compares_against_the_base_with_its_adapters_off(tmp_path, small):
    """At the start the adapters add nothing: the policy is its reference, every ratio and the baseline 0, every
    loss w / 2 (a reference that were anything else would move them); then the adapters move it."""
    from hsa_train.model.loading import build_model, load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    build_model(None, BASE_ARCH, tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run = kto(
        tmp_path / "lora", f"model.name_or_path={tmp_path / 'base'}", f"data.datasets={entry(small)}",
        "model.lora.enabled=true", "model.lora.dropout=0.0",
        "data.eval_ratio=0.25", "train.micro_batch_size=2", "train.max_steps=4", "train.lr=1e-2",
        "stage.desirable_weight=1.5",
    )  # fmt: skip
    assert run["reference"] == {"kind": "adapters_off"}
    chosen, rejected = run["train_stats"]["count/chosen"][0], run["train_stats"]["count/rejected"][0]
    assert run["train_losses"][0] == pytest.approx((1.5 * chosen + rejected) / 2 / (chosen + rejected), abs=1e-6)
    assert run["train_stats"]["kl"][0] == 0 and run["train_stats"]["rewards/margin"][0] in (0, None)
    assert run["eval_rewards"]["chosen"] != 0 and math.isfinite(run["eval_loss"])
