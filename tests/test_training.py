"""Pieces of the training recipe checked against independent computations."""

import math

import pytest
import torch

from hsa_train import enable_hsa
from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.training.loop import accumulate_gradients, make_forward
from hsa_train.training.loss import label_count
from hsa_train.training.optim import build_optimizer, lr_multiplier

CONVERSATIONS = [
    [
        {"role": "user", "content": "Task: find the key.", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "assistant", "content": "Action: go to the hallway."},
    ],
    [
        {"role": "user", "content": "You see a door."},
        {
            "role": "assistant",
            "content": "Action: open the door and look around carefully.",
            "semantic_type": "KEY_EVENT",
        },
    ],
    [{"role": "user", "content": "Battery at 12%."}, {"role": "assistant", "content": "Action: wait."}],
    [
        {"role": "system", "content": "Be brief.", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "user", "content": "Where is the apple?"},
        {"role": "assistant", "content": "In the fridge, on the second shelf.", "semantic_type": "KEY_EVENT"},
    ],
]


def test_accumulation_is_independent_of_the_split(tokenizer, model_factory, clone):
    """One step over 4 samples: the same loss and gradients as 1x4, 2x2 or 4x1 micro-batches."""
    feats = [SemanticTokenizer(tokenizer).encode(c) for c in CONVERSATIONS]
    collate = SemanticCollator(tokenizer.pad_token_id)
    base = enable_hsa(model_factory(vocab_size=len(tokenizer)), lambdas={"PROCESS_NOISE": 0.2})
    results = []
    for split in ([4], [2, 2], [1, 1, 1, 1]):
        model = clone(base)
        batches, start = [], 0
        for size in split:
            batches.append(collate(feats[start : start + size]))
            start += size
        n_labels = sum(label_count(b) for b in batches)
        loss, n_tokens, _ = accumulate_gradients(
            make_forward(model, torch.device("cpu"), None, True), batches, n_labels
        )
        results.append((loss, n_tokens, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    # reference: mean cross-entropy over every label token of the 4 samples, computed sample by sample
    model = clone(base)
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            ids, sem, labels = (torch.tensor(f[k])[None] for k in ("input_ids", "semantic_ids", "labels"))
            logits = model(input_ids=ids, semantic_ids=sem).logits[0, :-1]
            keep = labels[0, 1:] != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[0, 1:][keep], reduction="sum").item()
            count += int(keep.sum())
    assert results[0][1] == sum(len(f["input_ids"]) for f in feats)
    for loss, n_tokens, grads in results:
        assert loss == pytest.approx(total / count, rel=1e-5)
        assert n_tokens == results[0][1]
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-4)


def test_no_label_tokens_is_an_error(tokenizer, model_factory):
    feat = SemanticTokenizer(tokenizer).encode(CONVERSATIONS[0])
    feat["labels"] = [-100] * len(feat["labels"])
    model = enable_hsa(model_factory(vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="no label tokens"):
        accumulate_gradients(make_forward(model, torch.device("cpu"), None, True), [SemanticCollator(0)([feat])], 0)


def test_schedule_warmup_then_cosine():
    assert lr_multiplier(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_multiplier(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_vectors_and_lambdas(model_factory):
    model = enable_hsa(model_factory(), learnable=True)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.hsa.raw) not in decayed
    assert all(p.ndim >= 2 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def tiny_run(tmp_path, *extra: str):
    """An in-process run on 12 demo records with a one-layer model; returns (config, resolved, run directory)."""
    from conftest import demo_subset
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from hsa_train.config import validate

    data = demo_subset(tmp_path / "d.jsonl", 12)
    overrides = [
        f"data.train_files=[{data}]",
        "data.eval_ratio=0.25",
        "train.max_steps=3",
        "train.micro_batch_size=3",
        "model.arch.hidden_size=32",
        "model.arch.intermediate_size=64",
        "model.arch.num_hidden_layers=1",
        "logging.progress=none",
        "train.save_model=false",
        *extra,
    ]
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True)


def test_a_run_is_deterministic(tmp_path):
    """Same seed, same config: identical losses and eval, run in-process twice."""
    from hsa_train.training.loop import train

    run, resolved = tiny_run(tmp_path, "hsa.head_scaling=alibi", "train.eval_every=2")
    first = train(run, resolved, tmp_path / "a")
    second = train(run, resolved, tmp_path / "b")
    for key in ("train_losses", "eval_loss", "eval_loss_per_type", "tokens_seen"):
        assert first[key] == second[key], key
    assert first["samples_train"] == 9 and first["samples_eval"] == 3
    assert not (tmp_path / "a" / "model").exists() and (tmp_path / "a" / "metrics.json").is_file()


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    from hsa_train.training.loop import train

    plain = train(*tiny_run(tmp_path), tmp_path / "plain")
    checkpointed = train(*tiny_run(tmp_path, "train.gradient_checkpointing=true"), tmp_path / "gc")
    for a, b in zip(plain["train_losses"], checkpointed["train_losses"]):
        assert a == pytest.approx(b, abs=1e-6)


def _nan_at_call(n: int, make_forward):
    """Wraps make_forward so that the n-th forward (1-based) returns NaN logits: a poisoned batch."""
    calls = {"n": 0}

    def factory(*args, **kwargs):
        forward = make_forward(*args, **kwargs)

        def poisoned(batch):
            calls["n"] += 1
            logits = forward(batch)
            return logits * float("nan") if calls["n"] == n else logits

        return poisoned

    return factory


def test_nan_stops_the_run_at_its_step_without_saving(tmp_path, monkeypatch):
    from hsa_train.training import loop, recipe

    monkeypatch.setattr(recipe, "make_forward", _nan_at_call(2, recipe.make_forward))
    run, resolved = tiny_run(tmp_path, "train.save_model=true", "train.save_every=1")
    with pytest.raises(loop.NonFiniteError, match=r"^step 2: non-finite loss .* on samples \[.*d.jsonl:\d+"):
        loop.train(run, resolved, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000001"]  # nothing after the NaN


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    from hsa_train.training import loop, recipe

    monkeypatch.setattr(recipe, "make_forward", _nan_at_call(2, recipe.make_forward))
    metrics = loop.train(*tiny_run(tmp_path, "train.skip_nonfinite=true"), tmp_path / "run")
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 3
    assert math.isnan(metrics["train_losses"][1]) and math.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("head_scaling", ["none", "alibi"])
def test_checkpointing_with_learnable_lambdas_gives_the_same_gradients(
    tokenizer, model_factory, clone, backend, head_scaling
):
    """Learnable λ under activation checkpointing, several layers: the bias is built in the first layer and shared,
    and the recomputation must neither crash nor change a gradient (λ's included)."""
    from hsa_train.model.loading import enable_activation_checkpointing

    feats = [SemanticTokenizer(tokenizer).encode(c) for c in CONVERSATIONS]
    batch = SemanticCollator(tokenizer.pad_token_id)(feats)
    base = enable_hsa(
        model_factory(vocab_size=len(tokenizer), layers=3),
        lambdas={"KEY_EVENT": 0.05, "PROCESS_NOISE": 0.2},
        backend=backend,
        head_scaling=head_scaling,
        learnable=True,
    ).train()
    grads = []
    for checkpointed in (False, True):
        model = clone(base)
        if checkpointed:
            enable_activation_checkpointing(model)
        n_labels = label_count(batch)
        accumulate_gradients(make_forward(model, torch.device("cpu"), None, True), [batch], n_labels)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "hsa.raw" in grads[0]
    assert grads[0]["hsa.raw"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
