"""The HSA bias (SPEC §3): bias_h(i, j) = -λ_h[s_j] · (i - j) for allowed (i, j), a large negative elsewhere.

λ_h[t] = λ[t] · m_h: one slope per type scaled per head (`head_scaling`), or one learned slope per head and type
(`learnable: per_head`, λ of shape (H, T)). The same formula feeds three backends: the materialised tensor here
(eager, sdpa) and the per-key slopes the flex `score_mod` reads (`key_decay`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsa_train.types import HEAD_SCALINGS


@dataclass(frozen=True)
class Span:
    """Where one attention call's queries and keys sit in the whole sequence, in absolute token positions.

    Training: queries and keys are the whole sequence. Decoding with a cache: the queries are the new tokens, the
    keys the cached ones plus them; a sliding-window layer keeps only the last keys, a static cache holds slots past
    the end (masked)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int


def head_slopes(num_heads: int, head_scaling: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """m_h per query head, or None when every head has slope 1 (the bias is then shared by all heads)."""
    if head_scaling == "none":
        return None
    if head_scaling == "alibi":
        h = torch.arange(num_heads, device=device, dtype=torch.float32)
        return torch.pow(2.0, -8.0 * h / num_heads)
    raise ValueError(f"head_scaling={head_scaling!r}: use one of {HEAD_SCALINGS}")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The bias is computed in float32, or float64 for float64 models (never in a low-precision dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_decay(
    key_types: torch.Tensor, lambdas: torch.Tensor, slopes: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """λ_h of every key in `dtype`: (B, H, K), or (B, 1, K) when the heads share it. `lambdas` is (T,) or (H, T)."""
    lam = lambdas.to(device=key_types.device, dtype=dtype)
    if lam.ndim == 1:
        per_key = lam[key_types][:, None, :]  # (B, 1, K)
    else:
        per_key = lam[:, key_types].permute(1, 0, 2)  # (H, B, K) -> (B, H, K)
    if slopes is not None:
        per_key = per_key * slopes.to(per_key.device)[None, :, None]
    return per_key


def hsa_bias(
    key_types: torch.Tensor,
    lambdas: torch.Tensor,
    allowed: torch.Tensor | None,
    span: Span,
    dtype: torch.dtype,
    slopes: torch.Tensor | None = None,
    additive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive attention mask with the HSA bias folded in, shape (B, H or 1, Q, K), in `dtype`.

    `key_types` (B, K) types every key of `span`. `allowed` is a boolean (B, 1|H, Q, K) mask (causal, padding,
    document boundaries); `additive_mask` a float mask to add instead, for callers that pass one; with neither,
    the pattern is causal. Distances are raw index differences: padding sits only at the ends of a row and
    documents are contiguous, so for every allowed pair this equals the distance inside the document, and it is
    the same under left padding.

    Differentiable in `lambdas` through `_HSABias`, which keeps no tensor in autograd's saved-tensor machinery:
    the one bias of a forward is built inside the first layer and reused by the others, and activation
    checkpointing recomputes that layer without rebuilding it, so nothing the rebuild would save may be missing
    (checkpointing compares the saved tensors of forward and recomputation and refuses a difference).
    """
    if lambdas.requires_grad and torch.is_grad_enabled():
        return _HSABias.apply(lambdas, key_types, allowed, span, dtype, slopes, additive_mask)
    return _build(key_types, lambdas, allowed, span, dtype, slopes, additive_mask)


def _distances(
    span: Span, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query positions, key positions and their (Q, K) distance i - j, clamped at 0 (later keys are masked)."""
    qpos = torch.arange(span.q_start, span.q_start + span.q_len, device=device, dtype=dtype)
    kpos = torch.arange(span.k_start, span.k_start + span.k_len, device=device, dtype=dtype)
    return qpos, kpos, (qpos[:, None] - kpos[None, :]).clamp_min_(0.0)


def _build(key_types, lambdas, allowed, span, dtype, slopes, additive_mask) -> torch.Tensor:
    work = work_dtype(dtype)
    qpos, kpos, distance = _distances(span, key_types.device, work)
    lam = key_decay(key_types, lambdas.detach(), slopes, work)  # (B, H|1, K)
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
    """bias = -λ_h[s_j]·(i - j) where allowed; dbias/dλ[t] = -Σ m_h·(i - j) over the allowed pairs whose key has
    type t (per head for (H, T) slopes). The backward needs only the types, the mask and the shapes (not λ, not
    the bias), held on `ctx` as plain attributes: inputs of the forward, so no reference cycle and nothing for
    checkpointing to count."""

    @staticmethod
    def forward(ctx, lambdas, key_types, allowed, span, dtype, slopes, additive_mask):
        ctx.key_types, ctx.allowed, ctx.span, ctx.slopes = key_types, allowed, span, slopes
        ctx.causal_only = allowed is None and additive_mask is None
        ctx.lambda_shape, ctx.lambda_dtype = lambdas.shape, lambdas.dtype
        return _build(key_types, lambdas, allowed, span, dtype, slopes, additive_mask)

    @staticmethod
    def backward(ctx, grad):
        types = ctx.key_types.to(grad.device)
        g = grad.double() if grad.dtype == torch.float64 else grad.float()
        qpos, kpos, distance = _distances(ctx.span, grad.device, g.dtype)
        if ctx.allowed is not None:
            g = g.masked_fill(~ctx.allowed, 0.0)
        elif ctx.causal_only:
            g = g.masked_fill(~(qpos[:, None] >= kpos[None, :]), 0.0)
        per_key = -(g * distance).sum(dim=-2)  # (B, H|1, K): Σ over queries of -(i - j)·grad
        if ctx.slopes is not None:
            per_key = per_key * ctx.slopes.to(per_key.device)[None, :, None]
        out = torch.zeros(ctx.lambda_shape, dtype=g.dtype, device=grad.device)
        if len(ctx.lambda_shape) == 1:
            out.index_add_(0, types.reshape(-1), per_key.sum(dim=1).reshape(-1))
        else:  # (H, T): one row per head, the per-key sums kept per head
            heads = out.shape[0]
            per_key = per_key.expand(-1, heads, -1).permute(1, 0, 2).reshape(heads, -1)  # (H, B*K)
            out.index_add_(1, types.reshape(-1), per_key)
        return out.to(ctx.lambda_dtype), None, None, None, None, None, None
