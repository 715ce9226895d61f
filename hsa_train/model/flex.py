"""The flex backend: HSA through `torch.nn.attention.flex_attention`, with no L x L tensor.

transformers' mask step hands the attention pattern over as a `MaskPlan` (its mask function, offsets and padding);
the first attention call of a forward turns it into a `BlockMask` that also confines packed documents (the forward
context knows them) and shares it with every layer. The bias is a `score_mod` that reads one slope per key (λ of its
type, (B, H|1, K) float32: O(N) memory, built in the model's pre-hook) and computes -λ·(i - j) in float32 inside
the kernel, after the logit soft-capping of models that have it (Gemma 2). Positions are device tensors made by
`arange`, never a tensor from a Python int (a host-to-device copy each call).

On CUDA the compiled kernel runs, forward and backward. On CPU flex runs forward only (training there is refused
with a clear error; `auto` picks sdpa on CPU), except that gradients in learnable λ alone go through `unfused`:
the same `score_mod` and mask over materialised scores, with plain autograd: how the λ gradient of the kernel's
formula is checked on CPU. (Not torch's own unfused flex: in torch 2.13 its backward returns garbage captured-buffer
gradients when the call sits inside `torch.utils.checkpoint`.)

Each distinct kernel (shapes, dtypes, padding or not, gradients or not) is one dynamo graph; past
`torch._dynamo.config.recompile_limit` dynamo would silently run flex unfused, materialising L x L scores. So the
collator buckets batch lengths (`data.collator.bucket_length`), this module counts the kernels a run asks for,
raises the limit to cover them (one log line), and stops with what to change where a run would need more than
`MAX_KERNELS`.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hsa_train.model.context import HSAForwardContext, forward_context
from hsa_train.model.mask import MaskPlan
from hsa_train.model.qkv import kernel_inputs, repeat_kv

log = logging.getLogger(__name__)

MAX_KERNELS = 64  # distinct compiled flex kernels one process may ask for before the run is stopped
UNFUSED_CPU_MAX_TOKENS = 4096  # flex's unfused path (CPU, λ gradients) materialises L x L scores: not past this

_compiled_flex: dict[str, object] = {}
_kernels: dict[str, set] = {}
_told_unfused = False


def block_mask(ctx: HSAForwardContext, plan: MaskPlan, query: torch.Tensor, key: torch.Tensor) -> BlockMask:
    """The plan's pattern AND padding AND same-document, as a BlockMask for this (query, key) (memoised)."""
    return ctx.memo(
        ("block_mask", id(plan), query.shape[2], key.shape[2], query.device), lambda: _build(ctx, plan, query, key)
    )


def _build(ctx: HSAForwardContext, plan: MaskPlan, query: torch.Tensor, key: torch.Tensor) -> BlockMask:
    span = ctx.span(query.shape[2], key.shape[2])
    offsets = (plan.q_offset, plan.kv_offset)
    if all(isinstance(o, int) for o in offsets) and offsets != (span.q_start, span.k_start):
        raise RuntimeError(
            f"the mask step placed queries at {plan.q_offset} and keys at {plan.kv_offset}, the HSA context at "
            f"{span.q_start} and {span.k_start}: the cache layout is not one HSA knows (DynamicCache or StaticCache)"
        )
    device = query.device
    pattern = plan.mask_function
    qabs = torch.arange(span.q_start, span.q_start + span.q_len, device=device)
    kabs = torch.arange(span.k_start, span.k_start + span.k_len, device=device)
    padding = plan.padding
    if padding is not None:
        padding = padding.to(device)
        if padding.shape[-1] < span.k_start + span.k_len:  # a static cache's slots past the end
            padding = torch.nn.functional.pad(padding, (0, span.k_start + span.k_len - padding.shape[-1]))
    docs = ctx.key_documents(span, device)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = pattern(b, h, qabs[q_idx], kabs[kv_idx])
        if padding is not None:
            allowed = allowed & padding[b, kabs[kv_idx]]
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
    attention_mask: MaskPlan | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """flex_attention with the HSA `score_mod`; (B, Q, H, D) like every attention function of the registry."""
    ctx = forward_context(kwargs)
    if dropout > 0 and module.training:
        raise ValueError(
            "hsa backend 'flex' has no attention dropout and this model trains with one: set its attention dropout "
            "to 0 (model.arch / the checkpoint's config), or use hsa.backend=sdpa"
        )
    if not isinstance(attention_mask, MaskPlan):
        raise RuntimeError(
            "hsa backend 'flex' got no mask plan from the mask step: the model builds its masks outside "
            "transformers' mask registry; use hsa.backend=sdpa"
        )
    query, key, value = kernel_inputs(query, key, value)
    ctx.debug_layer(module, "flex", query, key)
    mask = block_mask(ctx, attention_mask, query, key)
    span = ctx.span(query.shape[2], key.shape[2])
    lam = ctx.key_slopes(span, query.shape[1], query.device, query.dtype)  # a slice: nothing saved, nothing memoised
    per_head = lam.shape[1] > 1
    lam = lam if per_head else lam[:, 0]
    # key j's position relative to the first query: i - j = q_idx - krel[kv_idx]
    krel = torch.arange(span.k_start - span.q_start, span.k_start - span.q_start + span.k_len, device=query.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        slope = lam[b, h, kv_idx] if per_head else lam[b, kv_idx]
        return score - slope * (q_idx - krel[kv_idx])

    inputs_need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    needs_grad = inputs_need_grad or (torch.is_grad_enabled() and lam.requires_grad)
    if query.device.type == "cpu" and inputs_need_grad:
        raise RuntimeError(
            "hsa backend 'flex' cannot train on CPU (FlexAttention's backward needs CUDA): use hsa.backend=auto "
            "(sdpa on CPU, flex on CUDA), sdpa or eager"
        )
    signature = (
        tuple(query.shape), tuple(key.shape), tuple(value.shape), query.dtype, tuple(lam.shape), needs_grad,
        attention_mask.padding is not None, ctx.documents is not None, softcap, scaling,
    )  # fmt: skip
    out = _flex(query.device, needs_grad, signature, cached=ctx.cached)(
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


def _flex(device: torch.device, needs_grad: bool, signature: tuple, cached: bool = False):
    """The kernel for one call.
    - Whole rows (training, evaluation): a static-shape compiled kernel per bucketed shape, counted (`_reserve`).
    - With a KV cache (generation: prompt lengths are not bucketed and keys grow a token a step): on CUDA one
      dynamic-shape compiled kernel for every length; on CPU `unfused` (a decode step's scores are 1 x K).
    - CPU gradients (λ's only: `use_compiled`): `unfused`.
    `unfused` is refused past `UNFUSED_CPU_MAX_TOKENS`² scores per head, before it materialises them."""
    global _told_unfused
    if cached and device.type != "cpu":
        if "dynamic" not in _compiled_flex:
            _compiled_flex["dynamic"] = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex["dynamic"]
    if cached or not use_compiled(device, needs_grad):
        queries, keys = signature[0][2], signature[1][2]
        if queries * keys > UNFUSED_CPU_MAX_TOKENS**2:
            raise RuntimeError(
                f"hsa flex on CPU runs unfused here (λ gradients, or a KV cache), materialising {queries} x {keys} "
                f"scores per head: keep sequences under {UNFUSED_CPU_MAX_TOKENS} tokens there, or use "
                "hsa.backend=sdpa"
            )
        if not _told_unfused:
            log.info("hsa flex: unfused on %s (scores materialised: λ gradients or a KV cache)", device)
            _told_unfused = True
        return unfused
    _reserve(device.type, signature)
    if device.type not in _compiled_flex:
        # Static shapes: the collator buckets lengths, so each kernel is built for the shapes it serves and a run
        # builds a known number of them (inductor's CPU flex template also miscompiles dynamic shapes in 2.13).
        _compiled_flex[device.type] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex[device.type]


def unfused(query, key, value, score_mod, block_mask: BlockMask, scale: float | None = None, enable_gqa: bool = True):
    """flex_attention's semantics over materialised scores: `score_mod` and the block mask's `mask_mod` evaluated
    on broadcast (b, h, q, kv) index grids, the softmax in float32, rows with no allowed key 0 (as flex gives)."""
    B, H, Q, D = query.shape
    K = key.shape[2]
    key, value = repeat_kv(key, H // key.shape[1]), repeat_kv(value, H // key.shape[1])
    dev = query.device
    b, h = torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(H, device=dev).view(1, H, 1, 1)
    i, j = torch.arange(Q, device=dev).view(1, 1, Q, 1), torch.arange(K, device=dev).view(1, 1, 1, K)
    scale = scale if scale is not None else D**-0.5
    scores = score_mod((query @ key.transpose(-1, -2)).float() * scale, b, h, i, j)
    allowed = block_mask.mask_mod(b, h, i, j).expand_as(scores)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)
    return (weights.to(value.dtype) @ value).to(query.dtype)


def _reserve(device_type: str, signature: tuple) -> None:
    """Counts the distinct kernels asked for; keeps dynamo's recompile limit above that count, so it never falls
    back to the unfused path, and stops the run where the count passes `MAX_KERNELS`."""
    seen = _kernels.setdefault(device_type, set())
    if signature in seen:
        return
    if len(seen) >= MAX_KERNELS:
        q, k = signature[0], signature[1]
        raise RuntimeError(
            f"hsa flex: a {MAX_KERNELS + 1}th distinct kernel (queries {q}, keys {k}) would be compiled: batch "
            "lengths are not bucketed; leave data.pad_to_multiple_of null (the collator then buckets lengths) or "
            "set it to 128 or more"
        )
    seen.add(signature)
    limit = torch._dynamo.config.recompile_limit
    if len(seen) > limit:
        torch._dynamo.config.recompile_limit = min(MAX_KERNELS, max(2 * limit, len(seen)))
        log.info(
            "hsa flex: %d distinct flex kernels so far; torch._dynamo recompile_limit raised from %d to %d so none "
            "falls back to flex's unfused path",
            len(seen),
            limit,
            torch._dynamo.config.recompile_limit,
        )
