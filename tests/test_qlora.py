"""QLoRA on CPU (bitsandbytes runs 4-bit and 8-bit there): the base's linear layers quantized as they load, HSA
reaching the quantized model (against the full-precision model with the dequantized weights), λ in fp32 beside
the adapters, and runs (in process, as the CLI runs them): SFT with activation checkpointing and a mid-run
evaluation, DPO with the adapters-off reference, 4-bit and 8-bit training resumed exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import demo_subset, run_in_process

pytest.importorskip("bitsandbytes")

from hsa_train import enable_hsa  # noqa: E402
from hsa_train.model.loading import build_model, load_tokenizer  # noqa: E402

ARCH = {
    "type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = build_model(None, ARCH, tokenizer)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    demo_subset(root / "data.jsonl", 24)
    return root


def test_the_bias_reaches_a_4bit_base_as_it_reaches_its_dequantized_weights(base):
    from types import SimpleNamespace

    import bitsandbytes as bnb

    from hsa_train.model.lora import trainable_parts

    tokenizer = load_tokenizer(None)
    quantized = build_model(str(base / "base"), None, tokenizer, quantization="4bit", device=torch.device("cpu"))
    linears = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer; the output head stays unquantized
    # the reference: the full-precision model carrying the weights the 4-bit layers hold, dequantized
    dense = build_model(str(base / "base"), None, tokenizer)
    names = {id(m): n for n, m in quantized.named_modules()}
    with torch.no_grad():
        for layer in linears:
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            dense.get_submodule(names[id(layer)]).weight.copy_(weight.float())
    torch.manual_seed(1)
    ids, sem = torch.randint(0, len(tokenizer), (2, 40)), torch.randint(0, 3, (2, 40))
    with torch.no_grad():
        plain = dense(input_ids=ids).logits  # no bias
        enable_hsa(quantized, LAMBDAS, learnable=True)  # the same slopes, as parameters
        enable_hsa(dense, LAMBDAS)
        got = quantized(input_ids=ids, semantic_ids=sem).logits.float()
        want = dense(input_ids=ids, semantic_ids=sem).logits
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.03 * scale  # bf16 compute of the same weights
    assert (plain - want).abs().max() > 5 * (got - want).abs().max()  # and the bias is what they share
    cfg = SimpleNamespace(
        quantization="4bit", freeze_vision=None,
        lora=SimpleNamespace(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
    )  # fmt: skip
    model, notes = trainable_parts(quantized, cfg, train_lambdas=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.endswith("hsa.raw") for n in trained)
    raw = next(p for n, p in model.named_parameters() if n.endswith("hsa.raw"))
    assert raw.dtype == torch.float32 and raw.requires_grad  # λ in full precision
    assert any("quantized (4bit" in note for note in notes)


def cli(base: Path, name: str, *extra: str) -> dict:
    args = [
        f"model.name_or_path={base / 'base'}",
        "model.lora.enabled=true",
        "model.lora.dropout=0.0",
        "hsa.learnable=true",
        "train.lr=0.01",
        "train.micro_batch_size=4",
        "logging.progress=none",
        *extra,
    ]
    return run_in_process(base / name, *args)


def test_qlora_sft_trains_with_checkpointing_and_exports_its_adapter(base):
    metrics = cli(
        base, "sft4", "model.quantization=4bit", "train.gradient_checkpointing=true",
        f"data.train_files=[{base / 'data.jsonl'}]", "data.eval_ratio=0.2", "train.max_steps=8",
        "train.eval_every=4",  # training goes on after an evaluation
    )  # fmt: skip
    assert all(math.isfinite(x) for x in metrics["train_losses"])
    assert metrics["train_losses"][-1] < metrics["train_losses"][0]
    assert metrics["params_trained"] < metrics["params"] / 4
    learned = json.loads((base / "sft4" / "adapter" / "hsa_config.json").read_text())["lambdas"]
    assert learned != LAMBDAS  # λ trained beside the adapters
    assert (base / "sft4" / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_dpo_compares_against_the_quantized_base_with_adapters_off(base):
    from hsa_train.config import bundled_path

    pairs = base / "pairs.jsonl"
    pairs.write_text("\n".join(Path(bundled_path("demo/preferences.jsonl")).read_text().splitlines()[:12]) + "\n")
    metrics = cli(
        base, "dpo4", "stage=dpo", "data=dpo_demo", "model.quantization=4bit",
        f"data.datasets=[{{path:{pairs},ranking:true}}]", "data.eval_ratio=0.25", "train.max_steps=3",
    )  # fmt: skip
    assert metrics["reference"] == {"kind": "adapters_off"}
    assert metrics["train_losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert metrics["eval_pairs"] == 3 and math.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_checkpoints_resume_exactly(base, bits):
    """Checkpoints hold the trained parameters by name (an int8 base's state dict has entries DCP cannot map)."""
    args = [f"model.quantization={bits}", f"data.train_files=[{base / 'data.jsonl'}]", "data.eval_ratio=0"]
    args += ["train.max_steps=3"]
    whole = cli(base, f"whole{bits}", *args, "train.save_every=1", "train.keep_last=null")
    mid = base / f"whole{bits}" / "checkpoints" / "step_0000001"
    resumed = cli(base, f"resumed{bits}", *args, f"train.resume={mid}")
    assert all(math.isfinite(x) for x in whole["train_losses"]) and whole["train_losses"][-1] < whole["train_losses"][0]
    assert resumed["resumed_from"] == str(mid) and resumed["train_losses"] == whole["train_losses"]
    assert resumed["hsa_learned"] == whole["hsa_learned"]
