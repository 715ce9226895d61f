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
    """
    k_len = semantic_ids.shape[-1]
    device = semantic_ids.device
    qpos = torch.arange(k_len - q_len, k_len, device=device, dtype=torch.float32)
    kpos = torch.arange(k_len, device=device, dtype=torch.float32)
    distance = (qpos[:, None] - kpos[None, :]).clamp_min_(0.0)  # (Q, K); negative ones are masked anyway
    lam = key_decay(semantic_ids, lambdas, slopes)  # (B, H|1, K)
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
