"""LoRA end to end on a local base checkpoint: training (alone and under DDP), adapter and merged exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BASE_ARCH, assert_ran, demo_subset, run_cli, run_torchrun

from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.model.export import load_exported
from hsa_train.model.loading import build_model, load_tokenizer

ARCH = BASE_ARCH


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    base = build_model(None, ARCH, tokenizer)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    demo_subset(root / "data.jsonl", 40)
    return root


def run(root: Path, name: str, *extra: str, nproc: int = 1) -> dict:
    args = [
        f"model.name_or_path={root / 'base'}",
        "model.lora.enabled=true",
        "model.lora.dropout=0.0",
        "hsa.learnable=true",
        "train.lr=0.01",
        f"data.train_files=[{root / 'data.jsonl'}]",
        "data.eval_ratio=0.1",
        "train.max_steps=6",
        "logging.progress=none",
        f"hydra.run.dir={root / name}",
        *extra,
    ]
    if nproc == 1:
        proc = run_cli(*args, cwd=root)
    else:
        proc = run_torchrun(*args, cwd=root, nproc=nproc, timeout=600)
    assert_ran(proc)
    return json.loads((root / name / "metrics.json").read_text())


def test_lora_trains_exports_and_reloads(setup):
    metrics = run(setup, "single", "train.micro_batch_size=4", "export.merge=true")
    assert metrics["params_trained"] < metrics["params"] / 5
    assert metrics["train_losses"][-1] < metrics["train_losses"][0]
    adapter, merged = setup / "single" / "adapter", setup / "single" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "hsa_config.json", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    learned = json.loads((adapter / "hsa_config.json").read_text())["lambdas"]
    assert learned != {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}  # λ trained with the adapter
    tokenizer = load_tokenizer(str(adapter))
    st = SemanticTokenizer(tokenizer)
    rows = [json.loads(line)["messages"] for line in (setup / "data.jsonl").read_text().splitlines()[:3]]
    batch = SemanticCollator(tokenizer.pad_token_id)([st.encode(r) for r in rows])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "semantic_ids")}
    with torch.no_grad():
        via_adapter = load_exported(adapter)(**inputs).logits
        via_merged = load_exported(merged)(**inputs).logits
        base = load_exported(setup / "base")(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(via_merged[real], via_adapter[real], atol=1e-5, rtol=1e-5)
    assert (via_adapter[real] - base[real]).abs().max() > 1e-3  # the adapter changed something
    assert load_exported(merged).config.hsa["lambdas"] == learned


def test_lora_under_ddp_matches_single_process(setup):
    single = run(setup, "single_ref", "train.micro_batch_size=4")
    ddp = run(setup, "ddp", "train.micro_batch_size=2", nproc=2)
    assert ddp["distributed"] == "ddp"
    for a, b in zip(ddp["train_losses"], single["train_losses"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_lora_checkpoints_hold_only_what_trains_and_resume_exactly(setup):
    full = run(setup, "ckpt", "train.micro_batch_size=4", "train.save_every=2", "train.keep_last=null")
    mid = setup / "ckpt" / "checkpoints" / "step_0000004"
    resumed = run(setup, "ckpt_resumed", "train.micro_batch_size=4", f"train.resume={mid}")
    assert resumed["train_losses"] == full["train_losses"]
    base_bytes = sum(p.stat().st_size for p in (setup / "base").glob("*.safetensors"))
    saved_bytes = sum(p.stat().st_size for p in (mid / "state").iterdir())
    assert saved_bytes < base_bytes  # adapters, λ and their optimizer state: not the frozen base
