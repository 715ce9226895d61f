"""Attention diagnostics: shares per key type, checked against stock transformers' eager attention weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_env

from hsa_train.data import SemanticTokenizer
from hsa_train.data.dataset import encode_files
from hsa_train.diagnose import attention_by_type
from hsa_train.model import enable_hsa

DEMO = ROOT / "data" / "demo" / "trajectories.jsonl"


@pytest.fixture(scope="module")
def samples(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("diag") / "three.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:3]))
    return encode_files([str(path)], SemanticTokenizer(tokenizer))[0]


def _reference_shares(stock, samples, queries: str) -> np.ndarray:
    """Shares from stock eager attention weights, summed by brute force over keys of each type."""
    stock.set_attn_implementation("eager")
    layers = stock.config.num_hidden_layers
    total, n = np.zeros((layers, 3)), 0
    for s in samples:
        ids = torch.as_tensor(s.features["input_ids"], dtype=torch.long)[None]
        sem = s.features["semantic_ids"]
        rows = range(s.answer[0] - 1, s.answer[1] - 1) if queries == "answer" else range(ids.shape[1])
        with torch.no_grad():
            attentions = stock(input_ids=ids, output_attentions=True).attentions
        for layer, weights in enumerate(attentions):
            w = weights[0].double().mean(0).numpy()
            for q in rows:
                for k in range(q + 1):
                    total[layer, sem[k]] += w[q, k]
        n += len(rows)
    return total / n


@pytest.mark.parametrize("queries", ["answer", "all"])
def test_shares_without_bias_match_stock_attention(tokenizer, model_factory, clone, samples, queries):
    stock = model_factory(vocab_size=len(tokenizer), layers=2)
    model = enable_hsa(clone(stock), {"KEY_EVENT": 0.05, "PROCESS_NOISE": 0.5}, backend="eager")
    result = attention_by_type(model, samples[:2], 3, queries)
    reference = _reference_shares(stock, samples[:2], queries)
    np.testing.assert_allclose(result["without_bias"].numpy(), reference, atol=1e-6)
    np.testing.assert_allclose(result["with_bias"].sum(-1).numpy(), 1.0, atol=1e-6)
    noise = 2
    assert (result["with_bias"][:, noise] < result["without_bias"][:, noise] - 0.1).all()  # the noise fades
    assert model.hsa.values().tolist() == pytest.approx([0.0, 0.05, 0.5])  # λ restored after the λ = 0 pass


def test_zero_lambdas_change_nothing(tokenizer, model_factory, samples):
    model = enable_hsa(model_factory(vocab_size=len(tokenizer)), {"KEY_EVENT": 0.0, "PROCESS_NOISE": 0.0}, "eager")
    result = attention_by_type(model, samples[:1], 3, "answer")
    torch.testing.assert_close(result["with_bias"], result["without_bias"])
    assert result["keys"].sum().item() == pytest.approx(1.0)


def test_cli_writes_table_files_and_heatmap(tokenizer, model_factory, tmp_path):
    model = enable_hsa(model_factory(vocab_size=len(tokenizer)), {"PROCESS_NOISE": 0.3})
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cmd = [sys.executable, "-m", "hsa_train.diagnose", str(tmp_path / "model"), "--data", str(DEMO)]
    proc = subprocess.run([*cmd, "--samples", "2"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "diagnostics"
    report = json.loads((out / "attention_by_type.json").read_text())
    assert report["samples"] == 2 and report["lambdas"]["PROCESS_NOISE"] == 0.3
    assert len(report["with_bias"]) == 2 and len(report["with_bias"][0]) == 3
    assert "with / without bias" in (out / "attention_by_type.md").read_text()
    assert "PROCESS_NOISE" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install -e '.[plot]'" in proc.stdout
    else:
        assert (out / "attention_by_type.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([*cmd, "--lambda", "NOISE"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "TYPE=VALUE" in bad.stderr
