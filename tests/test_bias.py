"""Both attention backends against a per-element evaluation of the SPEC §3 formula, written out with loops."""

from __future__ import annotations

import math

import pytest
import torch

from hsa_train.model.attention import hsa_eager_attention, hsa_mask, hsa_sdpa_attention
from hsa_train.model.context import HSAForwardContext

LAMBDAS = [0.0, 0.07, 0.5]


class FakeAttention(torch.nn.Module):
    """Stands in for a model's attention module: the functions only read `training`."""


def brute_force(q, k, v, semantic_ids, padding, lambdas, head_scaling, scale=None):
    """out[b, i, h] = Σ_j softmax_j(q·k/√d - λ[s_j]·m_h·(i-j)) v[j], over j ≤ i that are not padding. The Q
    queries are the last Q of the K key positions (a KV-cache step when Q < K)."""
    B, H, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            m_h = 2.0 ** (-8.0 * h / H) if head_scaling == "alibi" else 1.0
            for row in range(Q):
                i = K - Q + row  # the query's absolute position
                scores, values = [], []
                for j in range(K):
                    if j > i or not padding[b][j]:
                        continue
                    dot = sum(float(q[b, h, row, d]) * float(k[b, h // (H // Hkv), j, d]) for d in range(D))
                    lam = lambdas[int(semantic_ids[b][j])] * m_h
                    scores.append(dot * (scale if scale is not None else 1 / math.sqrt(D)) - lam * (i - j))
                    values.append(v[b, h // (H // Hkv), j].double())
                if not scores:
                    continue
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[b, row, h] = sum(w / total * val for w, val in zip(weights, values))
    return out


@pytest.mark.parametrize("head_scaling", ["none", "alibi"])
@pytest.mark.parametrize("attention", [hsa_eager_attention, hsa_sdpa_attention], ids=["eager", "sdpa"])
def test_backends_match_the_formula(attention, head_scaling):
    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 7, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    semantic_ids = torch.tensor([[0, 2, 1, 2, 2, 1, 0], [2, 2, 0, 1, 2, 2, 2]])
    padding = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])  # second row left-padded
    mask = hsa_mask(batch_size=B, q_length=L, kv_length=L, attention_mask=padding.bool())
    ctx = HSAForwardContext(semantic_ids, torch.tensor(LAMBDAS), head_scaling, num_heads=H)
    out, _ = attention(FakeAttention().eval(), q, k, v, mask, scaling=D**-0.5, hsa_context=ctx)
    ref = brute_force(q, k, v, semantic_ids, padding, LAMBDAS, head_scaling)
    real = padding.bool()  # rows of padding queries are unconstrained
    torch.testing.assert_close(out.double()[real], ref[real], atol=1e-5, rtol=1e-5)


def test_bias_is_built_once_per_forward_and_shared_by_heads():
    ctx = HSAForwardContext(torch.zeros(1, 5, dtype=torch.long), torch.tensor(LAMBDAS), "none")
    mask = hsa_mask(batch_size=1, q_length=5, kv_length=5)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    first = ctx.attention_bias(mask, q, k, torch.float32)
    assert ctx.attention_bias(mask, q, k, torch.float32) is first
    assert first.shape == (1, 1, 5, 5)
    alibi = HSAForwardContext(torch.zeros(1, 5, dtype=torch.long), torch.tensor(LAMBDAS), "alibi", num_heads=4)
    assert alibi.attention_bias(mask, q, k, torch.float32).shape == (1, 4, 5, 5)


def test_fixed_lambdas_build_no_graph_learnable_ones_do():
    mask = hsa_mask(batch_size=1, q_length=4, kv_length=4)
    q, k = torch.randn(1, 2, 4, 8, requires_grad=True), torch.randn(1, 2, 4, 8)
    fixed = HSAForwardContext(torch.ones(1, 4, dtype=torch.long), torch.tensor(LAMBDAS), "none")
    assert not fixed.attention_bias(mask, q, k, torch.float32).requires_grad
    lam = torch.tensor(LAMBDAS, requires_grad=True)
    learn = HSAForwardContext(torch.ones(1, 4, dtype=torch.long), lam, "none")
    learn.attention_bias(mask, q, k, torch.float32).sum().backward()
    # d/dλ[1] of Σ -λ[1]·(i-j) over the causal pairs of 4 tokens = -(1+2+3 + 1+2 + 1) = -10
    assert lam.grad.tolist() == [0.0, -10.0, 0.0]


@pytest.mark.parametrize("head_scaling", ["none", "alibi"])
@pytest.mark.parametrize("attention", [hsa_eager_attention, hsa_sdpa_attention], ids=["eager", "sdpa"])
def test_fewer_queries_than_keys_match_the_formula(attention, head_scaling):
    """A decoding step with a cache: 3 new queries over 8 keys, queries at absolute positions 5, 6, 7."""
    torch.manual_seed(1)
    B, H, Hkv, K, Q, D = 2, 4, 2, 8, 3, 8
    q, k, v = torch.randn(B, H, Q, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    semantic_ids = torch.tensor([[0, 2, 1, 2, 2, 1, 0, 2], [2, 2, 0, 1, 2, 2, 2, 1]])
    padding = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])
    mask = hsa_mask(batch_size=B, q_length=Q, kv_length=K, q_offset=K - Q, attention_mask=padding.bool())
    assert mask.shape == (B, 1, Q, K)
    ctx = HSAForwardContext(semantic_ids, torch.tensor(LAMBDAS), head_scaling, num_heads=H)
    out, _ = attention(FakeAttention().eval(), q, k, v, mask, scaling=D**-0.5, hsa_context=ctx)
    ref = brute_force(q, k, v, semantic_ids, padding, LAMBDAS, head_scaling)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def reference_bias(semantic_ids, lambdas, allowed, q_len, slopes):
    """-λ[s_j]·m_h·(i - j) where allowed, written per element with autograd on λ (masked entries contribute 0)."""
    B, K = semantic_ids.shape
    H = 1 if slopes is None else len(slopes)
    rows = []
    for b in range(B):
        for h in range(H):
            m_h = 1.0 if slopes is None else float(slopes[h])
            for r in range(q_len):
                i = K - q_len + r
                for j in range(K):
                    if bool(allowed[b, 0, r, j]):
                        rows.append(-lambdas[int(semantic_ids[b, j])] * m_h * (i - j))
    return rows


@pytest.mark.parametrize("head_scaling", ["none", "alibi"])
@pytest.mark.parametrize("q_len", [6, 2])
def test_lambda_gradient_matches_a_per_element_reference(head_scaling, q_len):
    """The bias' own backward (it keeps no saved tensors, for checkpointing) against autograd through the formula
    written element by element, for a random upstream gradient."""
    from hsa_train.model.bias import Span, head_slopes, hsa_bias

    torch.manual_seed(2)
    B, K, H = 2, 6, 4
    semantic_ids = torch.tensor([[0, 2, 1, 2, 2, 1], [2, 1, 0, 1, 2, 2]])
    padding = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]]).bool()
    allowed = hsa_mask(batch_size=B, q_length=q_len, kv_length=K, q_offset=K - q_len, attention_mask=padding)
    slopes = head_slopes(H, head_scaling)
    lam = torch.tensor(LAMBDAS, requires_grad=True)
    bias = hsa_bias(semantic_ids, lam, allowed, Span(K - q_len, q_len, 0, K), torch.float32, slopes=slopes)
    upstream = torch.randn_like(bias)
    (bias * upstream).sum().backward()
    ours = lam.grad.clone()

    lam_ref = torch.tensor(LAMBDAS, dtype=torch.float64, requires_grad=True)
    entries = reference_bias(semantic_ids, lam_ref, allowed, q_len, slopes)
    weights = [
        float(upstream[b, 0 if slopes is None else h, r, j])
        for b in range(B)
        for h in range(1 if slopes is None else H)
        for r in range(q_len)
        for j in range(K)
        if bool(allowed[b, 0, r, j])
    ]
    sum(e * w for e, w in zip(entries, weights)).backward()
    torch.testing.assert_close(ours.double(), lam_ref.grad, atol=1e-5, rtol=1e-5)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("case", ["unpadded", "right-padded", "left-padded", "alibi", "per-head λ", "grouped 6 over 2"])
def test_both_sdpa_routes_match_the_formula(monkeypatch, case):
    """The sdpa backend takes the dot-product route (the bias as two extra q / k dimensions of a stock causal
    kernel) on a mask plan of a causal uncached batch, and the materialised bias on a boolean mask: both equal the
    formula, values and gradients in q, k, v and λ."""
    from hsa_train.model import attention as A
    from hsa_train.model.mask import hsa_mask_plan

    routes = []
    real_route = A.dot_product_attention
    monkeypatch.setattr(A, "dot_product_attention", lambda *a, **kw: routes.append(1) or real_route(*a, **kw))
    torch.manual_seed(7)
    B, H, Hkv, L, D = 2, 4, 2, 9, 8
    if case == "grouped 6 over 2":
        H = 6
    head_scaling = "alibi" if case == "alibi" else "none"
    pad = {"right-padded": [[1] * 9, [1] * 6 + [0] * 3], "left-padded": [[1] * 9, [0] * 4 + [1] * 5]}
    padding = torch.tensor(pad.get(case, [[1] * 9] * 2))
    semantic_ids = torch.randint(0, 3, (B, L))
    lambdas = torch.tensor(LAMBDAS, dtype=torch.float64)
    if case == "per-head λ":
        lambdas = torch.rand(H, 3, dtype=torch.float64) * 0.5
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    masks = {
        "dot product": hsa_mask_plan(batch_size=B, q_length=L, kv_length=L, attention_mask=padding.bool()),
        "materialised": hsa_mask(batch_size=B, q_length=L, kv_length=L, attention_mask=padding.bool()),
    }
    if case == "unpadded":
        masks["dot product"] = hsa_mask_plan(batch_size=B, q_length=L, kv_length=L)
    real = padding.bool()
    grads = {}
    for route, mask in masks.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        lam = lambdas.float().clone().requires_grad_()
        ctx = HSAForwardContext(semantic_ids, lam, head_scaling, num_heads=H)
        routes.clear()
        out, _ = hsa_sdpa_attention(FakeAttention().eval(), *leaves, mask, scaling=D**-0.5, hsa_context=ctx)
        assert len(routes) == (route == "dot product")
        if lambdas.ndim == 1:
            ref = brute_force(q, k, v, semantic_ids, padding, lambdas.tolist(), head_scaling)
        else:  # per head: the formula with each head's own λ
            ref = torch.stack(
                [brute_force(q, k, v, semantic_ids, padding, lambdas[h].tolist(), "none")[:, :, h] for h in range(H)],
                dim=2,
            )
        torch.testing.assert_close(out.double()[real], ref[real], atol=2e-5, rtol=2e-5)
        (out[real] * torch.linspace(-1, 1, out[real].numel()).view_as(out[real])).sum().backward()
        grads[route] = [t.grad for t in leaves] + [lam.grad]
    for ours, theirs in zip(grads["dot product"], grads["materialised"]):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
