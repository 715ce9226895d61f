"""The flex backend on its own: the compiled kernel against the SPEC §3 formula written out with loops, the bias
kept in float32 under bf16, one block mask per forward and pattern, and nothing of size L x L."""

from __future__ import annotations

import pytest
import torch
from test_bias import LAMBDAS, FakeAttention, brute_force

from hsa_train.model import flex
from hsa_train.model.context import HSAForwardContext
from hsa_train.model.flex import hsa_flex_attention
from hsa_train.model.mask import hsa_mask_plan


def run_flex(q, k, v, semantic_ids, padding, lambdas, head_scaling="none", softcap=None, scaling=None):
    B, Q, K = q.shape[0], q.shape[2], k.shape[2]
    plan = hsa_mask_plan(batch_size=B, q_length=Q, kv_length=K, q_offset=K - Q, attention_mask=padding.bool())
    ctx = HSAForwardContext(
        semantic_ids, torch.as_tensor(lambdas), head_scaling, num_heads=q.shape[1], new_tokens=Q, cached=Q < K
    )
    out, _ = hsa_flex_attention(
        FakeAttention().eval(), q, k, v, plan, scaling=scaling or q.shape[-1] ** -0.5, softcap=softcap, hsa_context=ctx
    )
    return out, ctx


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "unfused"])
@pytest.mark.parametrize("head_scaling", ["none", "alibi"])
@pytest.mark.parametrize("q_len", [7, 3])
def test_flex_matches_the_formula(monkeypatch, compiled, head_scaling, q_len):
    """Left padding, grouped-query heads, and a decoding step (3 queries over 7 keys)."""
    monkeypatch.setattr(flex, "use_compiled", lambda device, needs_grad: compiled)
    torch.manual_seed(0)
    B, H, Hkv, K, D = 2, 4, 2, 7, 16
    q, k, v = torch.randn(B, H, q_len, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    semantic_ids = torch.tensor([[0, 2, 1, 2, 2, 1, 0], [2, 2, 0, 1, 2, 2, 2]])
    padding = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out, _ = run_flex(q, k, v, semantic_ids, padding, LAMBDAS, head_scaling)
    ref = brute_force(q, k, v, semantic_ids, padding, LAMBDAS, head_scaling)
    real = padding.bool()[:, K - q_len :]
    torch.testing.assert_close(out.double()[real], ref[real], atol=1e-5, rtol=1e-5)


def test_grouped_heads_that_are_not_a_power_of_two():
    """28 query heads over 4 key/value heads is a 7B layout: 6 over 2 here, no key/value copies."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    sem, padding = torch.tensor([[0, 2, 1, 2, 1]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        out, _ = run_flex(q, k, v, sem, padding, LAMBDAS, "alibi")
    ref = brute_force(q, k, v, sem, padding, LAMBDAS, "alibi")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_soft_capping_comes_before_the_bias(monkeypatch):
    """Gemma 2: logits = cap·tanh(q·k·scale / cap) - λ·(i - j); checked against eager."""
    from hsa_train.model.attention import hsa_eager_attention, hsa_mask

    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 6, 8) * 4, torch.randn(1, 2, 6, 8) * 4, torch.randn(1, 2, 6, 8)
    sem, padding = torch.tensor([[0, 1, 2, 2, 1, 2]]), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        out, _ = run_flex(q, k, v, sem, padding, LAMBDAS, softcap=2.0)
        ctx = HSAForwardContext(sem, torch.tensor(LAMBDAS), "none", new_tokens=6)
        mask = hsa_mask(batch_size=1, q_length=6, kv_length=6)
        ref, _ = hsa_eager_attention(
            FakeAttention().eval(), q, k, v, mask, scaling=8**-0.5, softcap=2.0, hsa_context=ctx
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bias_stays_float32_under_bf16():
    """Far keys (100-140 back) that win on their logits (+90) against a bias of -73 to -102, where bf16 steps by
    0.5: flex adds -λ·(i - j) in float32 inside the kernel and weighs them as the formula does; sdpa's bf16 mask
    rounds every bias by up to 0.25 (up to 28% in weight)."""
    from hsa_train.model.attention import hsa_mask, hsa_sdpa_attention

    L, D = 141, 8
    semantic_ids = torch.tensor([[1] * 41 + [2] * 100])  # 41 KEY_EVENT keys, then noise that fades at once
    lambdas = [0.0, 0.73, 1000.0]
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 90.0
    k = torch.zeros(1, 1, L, D)
    k[0, 0, :41, 0] = 1.0  # logit 90 (scale 1) for the far keys, 0 for the rest
    v = torch.randn(1, 1, L, D).bfloat16().float()
    padding = torch.ones(1, L, dtype=torch.long)
    ref = brute_force(q, k, v, semantic_ids, padding, lambdas, "none", scale=1.0)[0, 0, 0]
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()  # exact in bf16
    with torch.no_grad():
        flex_out, _ = run_flex(q, k, v, semantic_ids, padding, lambdas, scaling=1.0)
        ctx = HSAForwardContext(semantic_ids, torch.tensor(lambdas), "none", new_tokens=1, cached=True)
        mask = hsa_mask(batch_size=1, q_length=1, kv_length=L, q_offset=L - 1)
        sdpa_out, _ = hsa_sdpa_attention(FakeAttention().eval(), q, k, v, mask, scaling=1.0, hsa_context=ctx)
    flex_err = (flex_out[0, 0, 0].double() - ref).abs().max()
    sdpa_err = (sdpa_out[0, 0, 0].double() - ref).abs().max()
    assert flex_err < 1e-2  # the bf16 output only
    assert sdpa_err > 3 * flex_err


def test_one_block_mask_per_forward_and_nothing_quadratic(monkeypatch):
    """Two layers share one BlockMask; what the forward keeps is O(N): the per-key slopes, never L x L."""
    built = []
    real = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    torch.manual_seed(4)
    B, H, L, D = 2, 4, 64, 8
    sem = torch.randint(0, 3, (B, L))
    padding = torch.ones(B, L, dtype=torch.long)
    plan = hsa_mask_plan(batch_size=B, q_length=L, kv_length=L, attention_mask=padding.bool())
    ctx = HSAForwardContext(sem, torch.tensor(LAMBDAS), "alibi", num_heads=H, new_tokens=L)
    with torch.no_grad():
        for _ in range(2):
            q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
            hsa_flex_attention(FakeAttention().eval(), q, k, v, plan, hsa_context=ctx)
    assert len(built) == 1
    assert list(ctx._memo) == [("block_mask", id(plan), L, L, torch.device("cpu"))]
    assert ctx.token_slopes.shape == (B, H, L)  # the per-key slopes, built in the pre-hook: O(N)


def test_a_model_through_compiled_flex_equals_eager(model_factory, clone):
    """The model path (mask step -> plan -> block mask) with the compiled CPU kernel, padding on both sides."""
    from test_model import batch_of, sample

    from hsa_train import enable_hsa

    stock = model_factory()
    lambdas = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}
    for side in ("left", "right"):
        ids, sem, mask = batch_of([sample(16, 1), sample(9, 2)], side)
        with torch.no_grad():
            outs = {
                backend: enable_hsa(clone(stock), lambdas=lambdas, backend=backend)(
                    input_ids=ids, attention_mask=mask, semantic_ids=sem
                ).logits
                for backend in ("eager", "flex")
            }
        real = mask.bool()
        torch.testing.assert_close(outs["flex"][real], outs["eager"][real], atol=1e-5, rtol=1e-5)


def test_auto_picks_per_device_and_model(model_factory):
    """auto: flex where attention runs on CUDA, sdpa (or eager for soft-capped logits) elsewhere; the default
    backend. Every backend's mask step records a plan (no data read). flex cannot train on CPU and says so."""
    from archs import tiny
    from transformers.masking_utils import AttentionMaskInterface

    from hsa_train import enable_hsa
    from hsa_train.model.attention import auto_choice, hsa_eager_attention, hsa_sdpa_attention
    from hsa_train.model.hsa import HSASettings
    from hsa_train.model.mask import MaskPlan, hsa_mask_plan

    assert HSASettings().backend == "auto"
    assert auto_choice("cuda", False, None) is hsa_flex_attention
    assert auto_choice("cuda", False, 30.0) is hsa_flex_attention  # flex soft-caps inside its score_mod
    assert auto_choice("cuda", True, None) is hsa_sdpa_attention  # flex has no attention dropout
    assert auto_choice("cpu", False, None) is hsa_sdpa_attention
    assert auto_choice("cpu", False, 30.0) is hsa_eager_attention
    plan = hsa_mask_plan(batch_size=1, q_length=4, kv_length=4, device="cpu")
    assert isinstance(plan, MaskPlan) and plan.causal and plan.padding is None
    for backend in ("eager", "sdpa", "flex", "auto"):
        enable_hsa(model_factory(), backend=backend)
        assert AttentionMaskInterface._global_mapping[f"hsa_{backend}"] is hsa_mask_plan
    gemma = enable_hsa(tiny("gemma2"))  # soft-capped: sdpa would refuse; auto serves it with eager on CPU
    assert gemma.config._attn_implementation == "hsa_auto"
    ids = torch.tensor([[3, 4, 5, 6]])
    gemma(input_ids=ids, semantic_ids=torch.tensor([[0, 1, 2, 2]]))
    with pytest.raises(ValueError, match="hsa.backend=sdpa on Gemma2ForCausalLM: .*; use hsa.backend=auto"):
        enable_hsa(tiny("gemma2"), backend="sdpa")
    flexed = enable_hsa(model_factory(), backend="flex")
    with pytest.raises(RuntimeError, match="cannot train on CPU"):
        flexed(input_ids=ids, semantic_ids=torch.tensor([[0, 1, 2, 2]]), labels=ids).loss.backward()


def test_models_outside_the_registry_are_refused():
    """A model whose attention is not a registered function gets a clear refusal, not a model that runs without
    the bias."""
    from legacy_attention_model import LegacyConfig, LegacyForCausalLM

    from hsa_train import enable_hsa

    model = LegacyForCausalLM(LegacyConfig())
    with pytest.raises(RuntimeError, match="LegacyForCausalLM did not accept .*does not go through transformers' Att"):
        enable_hsa(model)


def test_debug_logs_each_layer_once_and_checks_the_types(model_factory, caplog):
    from hsa_train import enable_hsa

    model = enable_hsa(model_factory(), debug=True, lambdas={"KEY_EVENT": 0.05})
    ids, sem = torch.tensor([[3, 4, 5, 6, 0]]), torch.tensor([[0, 1, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with caplog.at_level("INFO", logger="hsa_train.hsa_debug"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, semantic_ids=sem)
        model(input_ids=ids, attention_mask=mask, semantic_ids=sem)
    lines = [r.getMessage() for r in caplog.records if r.name == "hsa_train.hsa_debug"]
    assert len(lines) == 2 and lines[0].startswith("hsa.debug layer 0") and lines[1].startswith("hsa.debug layer 1")
    assert "KEY_EVENT: 1 keys, λ 0.05" in lines[0] and "GLOBAL_CONDITION: 1 keys, λ 0, mean bias -0" in lines[0]
    with pytest.raises(ValueError, match="row 0 has 1 padding positions"):
        model(input_ids=ids, attention_mask=mask, semantic_ids=torch.tensor([[2, 0, 1, 2, 1]]))
