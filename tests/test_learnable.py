"""Learnable slopes, per type or per head and type: gradients against finite differences on every backend that
trains (flex: λ alone, the kernel's formula through its unfused path on CPU), save and load, logging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import batch_of, sample

from hsa_train import enable_hsa
from hsa_train.model import flex
from hsa_train.model.export import save_pretrained
from hsa_train.model.hsa import learned_lambdas

LAMBDAS = {"GLOBAL_CONDITION": 0.02, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}  # > 0: clamping is smooth here


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("learnable", [True, "per_head"])
def test_lambda_gradient_matches_finite_differences(model_factory, monkeypatch, backend, learnable):
    monkeypatch.setattr(flex, "use_compiled", lambda device, needs_grad: False)
    # one layer: its q, k, v do not depend on λ, so flex's CPU forward may need gradients in λ alone
    model = enable_hsa(model_factory(layers=1), lambdas=LAMBDAS, backend=backend, learnable=learnable).double()
    raw = model.hsa.raw
    assert raw.shape == ((4, 3) if learnable == "per_head" else (3,))
    for p in model.parameters():
        p.requires_grad_(p is raw)  # weights frozen: flex has no CPU backward for them
    ids, sem, mask = batch_of([sample(12, 1), sample(7, 2)], "right")
    labels = ids.masked_fill(mask == 0, -100)

    def loss() -> torch.Tensor:  # in float64 (transformers' own loss casts logits to float32)
        logits = model(input_ids=ids, attention_mask=mask, semantic_ids=sem).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    loss().backward()
    eps = 1e-3  # the model's norms compute in float32 whatever its dtype: smaller steps drown in their rounding
    numeric = torch.zeros_like(raw)
    with torch.no_grad():
        for idx in np.ndindex(*raw.shape):
            raw[idx] += eps
            up = loss()
            raw[idx] -= 2 * eps
            down = loss()
            raw[idx] += eps
            numeric[idx] = (up - down) / (2 * eps)
    torch.testing.assert_close(raw.grad, numeric, rtol=2e-3, atol=5e-6)  # gradients ~1e-3, float32 norms
    assert raw.grad.abs().min() > 0  # every type (and head) gets a gradient


def test_per_head_lambdas_round_trip_and_are_logged(model_factory, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = enable_hsa(model_factory(), lambdas=LAMBDAS, learnable="per_head")
    with torch.no_grad():
        model.hsa.raw.copy_(torch.rand(4, 3) * 0.2)
    ids, sem = sample(10, 3)
    with torch.no_grad():
        before = model(input_ids=ids[None], semantic_ids=sem[None]).logits
    learned = learned_lambdas(model)
    assert learned == pytest.approx(dict(zip(LAMBDAS, model.hsa.raw.mean(0).tolist())))
    save_pretrained(model, tokenizer, tmp_path)
    stored = model.config.hsa["lambdas_per_head"]
    assert stored["KEY_EVENT"] == pytest.approx(model.hsa.raw[:, 1].tolist())
    loaded = enable_hsa(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    torch.testing.assert_close(loaded.hsa.raw, model.hsa.raw.detach())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids[None], semantic_ids=sem[None]).logits, before)
    fixed = enable_hsa(AutoModelForCausalLM.from_pretrained(tmp_path), lambdas={"KEY_EVENT": 0.1}, learnable=False)
    assert fixed.hsa.raw.shape == (3,)  # given λ replace the per-head table
    with pytest.raises(ValueError, match="hsa.learnable"):
        enable_hsa(model_factory(), learnable="per_type")
