"""The HSA bias (SPEC §3): bias_h(i, j) = -λ[s_j] · m_h · (i - j) for allowed (i, j), a large negative elsewhere."""

from __future__ import annotations

import torch

HEAD_SCALINGS = ("none", "alibi")


def head_slopes(num_heads: int, head_scaling: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """m_h per query head, or None when every head has slope 1 (the bias is then shared by all heads)."""
    if head_scaling == "none":
        return None
    if head_scaling == "alibi":
        h = torch.arange(num_heads, device=device, dtype=torch.float32)
        return torch.pow(2.0, -8.0 * h / num_heads)
    raise ValueError(f"head_scaling={head_scaling!r}: use one of {HEAD_SCALINGS}")


def key_decay(semantic_ids: torch.Tensor, lambdas: torch.Tensor, slopes: torch.Tensor | None) -> torch.Tensor:
    """λ of every key, per head: (B, H, K), or (B, 1, K) when the heads share it."""
    lam = lambdas.to(device=semantic_ids.device, dtype=torch.float32)[semantic_ids]  # (B, K)
    lam = lam[:, None, :]
    if slopes is not None:
        lam = lam * slopes.to(lam.device)[None, :, None]
    return lam


def hsa_bias(
    semantic_ids: torch.Tensor,
    lambdas: torch.Tensor,
    allowed: torch.Tensor | None,
    q_len: int,
    dtype: torch.dtype,
    slopes: torch.Tensor | None = None,
    additive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive attention mask with the HSA bias folded in, shape (B, H or 1, Q, K), in `dtype`.

    `semantic_ids` (B, K) types every key; the Q queries are the last Q of the K positions (training: Q == K;
    decoding with a cache: the new tokens). `allowed` is a boolean (B, 1|H, Q, K) mask (causal, padding,
    document boundaries); `additive_mask` a float mask to add instead, for callers that pass one.
    Distances are raw index differences: padding sits only at the ends of a row and documents are contiguous, so
    for every allowed pair this equals the distance inside the document, and it is the same under left padding.

    Differentiable in `lambdas` through `_HSABias`, which keeps no tensor in autograd's saved-tensor machinery:
    the one bias of a forward is built inside the first layer and reused by the others, and activation
    checkpointing recomputes that layer without rebuilding it, so nothing the rebuild would save may be missing
    (checkpointing compares the saved tensors of forward and recomputation and refuses a difference).
    """
    if lambdas.requires_grad and torch.is_grad_enabled():
        return _HSABias.apply(lambdas, semantic_ids, allowed, q_len, dtype, slopes, additive_mask)
    return _build(semantic_ids, lambdas, allowed, q_len, dtype, slopes, additive_mask)


def _distances(k_len: int, q_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query positions, key positions and their (Q, K) distance i - j, clamped at 0 (later keys are masked)."""
    qpos = torch.arange(k_len - q_len, k_len, device=device, dtype=torch.float32)
    kpos = torch.arange(k_len, device=device, dtype=torch.float32)
    return qpos, kpos, (qpos[:, None] - kpos[None, :]).clamp_min_(0.0)


def _build(semantic_ids, lambdas, allowed, q_len, dtype, slopes, additive_mask) -> torch.Tensor:
    qpos, kpos, distance = _distances(semantic_ids.shape[-1], q_len, semantic_ids.device)
    lam = key_decay(semantic_ids, lambdas.detach(), slopes)  # (B, H|1, K)
    bias = lam[:, :, None, :] * distance  # (B, H|1, Q, K) in float32: the one full-size temporary
    bias.neg_()
    if additive_mask is not None:
        return (bias + additive_mask).to(dtype)
    if allowed is None:
        allowed = (qpos[:, None] >= kpos[None, :])[None, None]
    # The target dtype's own minimum (exact in float32): a large finite negative, never -inf, so fully masked rows
    # (left-padding queries) softmax to finite values instead of NaN.
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.to(dtype)


class _HSABias(torch.autograd.Function):
    """bias = -λ[s_j]·m_h·(i - j) where allowed; dbias/dλ[t] = -Σ m_h·(i - j) over the allowed pairs whose key has
    type t. The backward needs only the types, the mask and the shapes (not λ, not the bias), held on `ctx` as
    plain attributes: inputs of the forward, so no reference cycle and nothing for checkpointing to count."""

    @staticmethod
    def forward(ctx, lambdas, semantic_ids, allowed, q_len, dtype, slopes, additive_mask):
        ctx.semantic_ids, ctx.allowed, ctx.q_len, ctx.slopes = semantic_ids, allowed, q_len, slopes
        ctx.causal_only = allowed is None and additive_mask is None
        ctx.n_types, ctx.lambda_dtype = lambdas.shape[0], lambdas.dtype
        return _build(semantic_ids, lambdas, allowed, q_len, dtype, slopes, additive_mask)

    @staticmethod
    def backward(ctx, grad):
        sem = ctx.semantic_ids
        qpos, kpos, distance = _distances(sem.shape[-1], ctx.q_len, grad.device)
        g = grad.float()
        if ctx.allowed is not None:
            g = g.masked_fill(~ctx.allowed, 0.0)
        elif ctx.causal_only:
            g = g.masked_fill(~(qpos[:, None] >= kpos[None, :]), 0.0)
        per_key = -(g * distance).sum(dim=-2)  # (B, H|1, K): Σ over queries of -(i - j)·grad
        if ctx.slopes is not None:
            per_key = per_key * ctx.slopes.to(per_key.device)[None, :, None]
        per_key = per_key.sum(dim=1)  # (B, K)
        out = torch.zeros(ctx.n_types, dtype=torch.float32, device=grad.device)
        out.index_add_(0, sem.reshape(-1).to(grad.device), per_key.reshape(-1))
        return out.to(ctx.lambda_dtype), None, None, None, None, None, None
