"""The flex backend: HSA through `torch.nn.attention.flex_attention`, with no L x L tensor.

transformers' mask step hands the attention pattern over as a `FlexMaskPlan` (its mask function, offsets and
padding); the first attention call of a forward turns it into a `BlockMask` that also confines packed documents
(the forward context knows them) and shares it with every layer. The bias is a `score_mod` that reads one slope per
key (λ of its type, (B, H|1, K) float32: O(N) memory) and computes -λ·(i - j) in float32 inside the kernel, after
the logit soft-capping of models that have it (Gemma 2).

On CUDA the compiled kernel runs, forward and backward. On CPU flex runs forward only (training there is refused
with a clear error; `auto` picks sdpa on CPU), except that gradients in learnable λ alone go through flex's unfused
path (same `score_mod`, scores materialised): how the λ gradient of the kernel's formula is checked on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hsa_train.model.context import HSAForwardContext

log = logging.getLogger(__name__)

# Batch lengths are padded to a multiple of this when flex runs (unless data.pad_to_multiple_of says otherwise):
# flex's block size, so few distinct shapes reach the compiled kernel and no block is partly out of range.
LENGTH_BUCKET = 128

_compiled_flex: dict[str, object] = {}
_told_unfused = False


@dataclass(eq=False)
class FlexMaskPlan(BlockMask):
    """The attention pattern of one mask step, in absolute positions: `mask_function(b, h, q, kv)` as transformers
    composed it (causal, sliding window, chunks, packed sequences it detected), the 2D padding mask, and where this
    call's queries and keys start (their offsets under a cache).

    It is a BlockMask only in type (no BlockMask state): transformers passes a 4-D BlockMask through its mask
    step untouched, which is what a mask prepared before the forward needs (generate with a static cache)."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Any
    padding: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)


def hsa_flex_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> FlexMaskPlan:
    """The mask step of the flex backend: records the pattern; the block mask is built by the first layer."""
    from transformers.masking_utils import causal_mask_function

    padding = None
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = attention_mask.to(device=device, dtype=torch.bool)
    return FlexMaskPlan(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=int(q_offset),
        kv_offset=int(kv_offset),
        mask_function=mask_function or causal_mask_function,
        padding=padding,
    )


def block_mask(ctx: HSAForwardContext, plan: FlexMaskPlan, query: torch.Tensor, key: torch.Tensor) -> BlockMask:
    """The plan's pattern AND padding AND same-document, as a BlockMask for this (query, key) (memoised)."""
    return ctx.memo(
        ("block_mask", id(plan), query.shape[2], key.shape[2], query.device), lambda: _build(ctx, plan, query, key)
    )


def _build(ctx: HSAForwardContext, plan: FlexMaskPlan, query: torch.Tensor, key: torch.Tensor) -> BlockMask:
    span = ctx.span(query.shape[2], key.shape[2])
    if (plan.q_offset, plan.kv_offset) != (span.q_start, span.k_start):
        raise RuntimeError(
            f"the mask step placed queries at {plan.q_offset} and keys at {plan.kv_offset}, the HSA context at "
            f"{span.q_start} and {span.k_start}: the cache layout is not one HSA knows (DynamicCache or StaticCache)"
        )
    device = query.device
    pattern = plan.mask_function
    q_off = torch.tensor(span.q_start, device=device)
    k_off = torch.tensor(span.k_start, device=device)
    padding = plan.padding
    if padding is not None:
        padding = padding.to(device)
        if padding.shape[-1] < span.k_start + span.k_len:  # a static cache's slots past the end
            padding = torch.nn.functional.pad(padding, (0, span.k_start + span.k_len - padding.shape[-1]))
    docs = ctx.key_documents(span, device)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = pattern(b, h, q_idx + q_off, kv_idx + k_off)
        if padding is not None:
            allowed = allowed & padding[b, kv_idx + k_off]
        if docs is not None:
            allowed = allowed & (docs[0][b, q_idx] == docs[1][b, kv_idx])
        return allowed

    return create_block_mask(
        mask_mod,
        B=plan.batch_size,
        H=None,
        Q_LEN=span.q_len,
        KV_LEN=span.k_len,
        device=device,
        _compile=device.type == "cuda",
    )


def hsa_flex_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: FlexMaskPlan | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """flex_attention with the HSA `score_mod`; (B, Q, H, D) like every attention function of the registry."""
    from hsa_train.model.attention import forward_context

    ctx = forward_context(kwargs)
    if dropout > 0 and module.training:
        raise ValueError(
            "hsa backend 'flex' has no attention dropout and this model trains with one: set its attention dropout "
            "to 0 (model.arch / the checkpoint's config), or use hsa.backend=sdpa"
        )
    if not isinstance(attention_mask, FlexMaskPlan):
        raise RuntimeError(
            "hsa backend 'flex' got no flex mask plan from the mask step: the model builds its masks outside "
            "transformers' mask registry; use hsa.backend=sdpa"
        )
    ctx.debug_layer(module, "flex", query, key)
    mask = block_mask(ctx, attention_mask, query, key)
    span = ctx.span(query.shape[2], key.shape[2])
    num_heads = query.shape[1]
    lam = ctx.memo(
        ("key_slopes", span, num_heads, query.device, query.dtype),
        lambda: ctx.key_slopes(span, num_heads, query.device, query.dtype),
    )
    per_head = lam.shape[1] > 1
    lam = lam if per_head else lam[:, 0]
    shift = torch.tensor(span.q_start - span.k_start, device=query.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        slope = lam[b, h, kv_idx] if per_head else lam[b, kv_idx]
        return score - slope * (q_idx + shift - kv_idx)

    inputs_need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    needs_grad = inputs_need_grad or (torch.is_grad_enabled() and lam.requires_grad)
    if query.device.type == "cpu" and inputs_need_grad:
        raise RuntimeError(
            "hsa backend 'flex' cannot train on CPU (FlexAttention's backward needs CUDA): use hsa.backend=auto "
            "(sdpa on CPU, flex on CUDA), sdpa or eager"
        )
    out = _flex(query.device, needs_grad)(
        query, key, value, score_mod=score_mod, block_mask=mask, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def runs_flex(backend: str, device: torch.device) -> bool:
    """Whether a model with `backend` on `device` attends through flex (auto picks it on CUDA)."""
    return backend == "flex" or (backend == "auto" and device.type == "cuda")


def use_compiled(device: torch.device, needs_grad: bool) -> bool:
    """Compiled flex everywhere but for CPU forwards that need gradients (only λ's can get there: compiled CPU flex
    has no backward, the unfused path has one for the score_mod's captured slopes)."""
    return not (device.type == "cpu" and needs_grad)


def _flex(device: torch.device, needs_grad: bool):
    """The compiled kernel, or flex's unfused path (`use_compiled`)."""
    global _told_unfused
    if not use_compiled(device, needs_grad):
        if not _told_unfused:
            log.info(
                "hsa flex: flex's unfused path on %s (scores materialised; compiled CPU flex has no backward)", device
            )
            _told_unfused = True
        return flex_attention
    if device.type not in _compiled_flex:
        # CUDA: shapes turn dynamic after the first recompile, so new lengths stop recompiling. CPU: static shapes
        # (inductor's CPU flex template miscompiles dynamic ones in torch 2.13); CPU flex is a reference there.
        dynamic = None if device.type == "cuda" else False
        _compiled_flex[device.type] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled_flex[device.type]
