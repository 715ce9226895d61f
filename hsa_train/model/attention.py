"""HSA attention functions, registered with transformers under one name per backend with the one mask function.

transformers calls the mask function once per forward and mask pattern and the attention function once per layer.
The mask function (`mask.hsa_mask_plan`, the same for every backend) records the pattern without reading data;
the first layer turns it into what its kernel takes and the others reuse it through the per-forward
`HSAForwardContext`:
- eager: the bias materialised (the reference);
- sdpa: on causal batches without a cache or packing (padded on either side or not), the bias as two extra
  query / key dimensions of a stock fused causal kernel (`dot_product_attention`: O(N) memory, exact to float32
  rounding); elsewhere (cache, packing, sliding windows, bf16) the materialised bias as SDPA's float mask;
- flex: a block mask and a `score_mod` (`flex.py`).

Under autocast every backend hands its kernel q, k and v in the autocast dtype, as the stock kernels get them.
`auto` picks per call: flex on CUDA (sdpa where the model trains with attention dropout), sdpa elsewhere, eager
where sdpa cannot serve (logit soft-capping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hsa_train.model.bias import work_dtype
from hsa_train.model.context import HSAForwardContext, forward_context
from hsa_train.model.flex import hsa_flex_attention
from hsa_train.model.mask import MaskPlan, allowed, hsa_mask_plan
from hsa_train.model.qkv import kernel_inputs, repeat_kv
from hsa_train.types import BACKENDS

MASKED = -1e30  # a masked key's logit on the dot-product route: exp() underflows to 0 in float32, never -inf


def implementation_name(backend: str) -> str:
    return f"hsa_{backend}"


def hsa_mask(*args, device: torch.device | str = "cpu", **kwargs) -> torch.Tensor:
    """(B, 1, Q, K) boolean of the pattern `hsa_mask_plan` records, materialised (for callers outside a model)."""
    return allowed(hsa_mask_plan(*args, device=device, **kwargs), torch.device(device))


def _bias(backend, module, query, key, attention_mask, kwargs, dtype) -> torch.Tensor:
    """This forward's bias in `dtype` (built by the first layer, reused by the others)."""
    ctx = forward_context(kwargs)
    ctx.debug_layer(module, backend, query, key)
    return ctx.attention_bias(attention_mask, query, key, dtype)


def hsa_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MaskPlan | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: logits = q·kᵀ·scale (+ softcap), then + bias and the softmax in float32 (the bias is never
    rounded to a low-precision dtype: in bf16 a slope-0.01 bias at distance 8,000 would move in steps of 0.5)."""
    query, key, value = kernel_inputs(query, key, value)
    bias = _bias("eager", module, query, key, attention_mask, kwargs, work_dtype(query.dtype))
    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention: key / value heads repeated
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.to(bias.dtype) + bias
    weights = F.softmax(logits, dim=-1).to(query.dtype)  # in the bias dtype: float32 (float64 for float64)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def hsa_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MaskPlan | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The dot-product route where it is exact (`dot_product_route`), else the bias (built once per forward,
    shared by heads when they share slopes) as SDPA's float mask, in the query's dtype (SDPA takes no other)."""
    if softcap is not None:
        raise ValueError(
            "hsa backend 'sdpa' does not support attention logit soft-capping (this model has it): use "
            "hsa.backend=auto, eager or flex"
        )
    query, key, value = kernel_inputs(query, key, value)
    ctx = forward_context(kwargs)
    dropout = dropout if module.training else 0.0
    if dot_product_route(ctx, attention_mask, query, key):
        ctx.debug_layer(module, "sdpa", query, key)
        out = dot_product_attention(ctx, attention_mask, query, key, value, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None
    bias = _bias("sdpa", module, query, key, attention_mask, kwargs, query.dtype)
    gqa = key.shape[1] != query.shape[1]
    if gqa and query.device.type != "cpu":
        # with a float mask, CUDA's SDPA takes grouped heads only in its math kernel (an L x L float32 softmax):
        # the heads are repeated there, and the memory-efficient kernel serves
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // key.shape[1])
        gqa = False
    # on CPU the fused kernel reads each key / value head for its query heads: no copy of the cache per layer
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous(), None


def dot_product_route(ctx: HSAForwardContext, plan, query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the bias can ride a stock causal kernel as extra dimensions: the plain causal pattern over the whole
    sequence (no cache offset, no sliding window, no packed documents) in float32 or float64 (in bf16 the
    position terms, ~λ·L, would round by more than the bias they encode)."""
    q_len, k_len = query.shape[2], key.shape[2]
    return (
        isinstance(plan, MaskPlan)
        and plan.causal
        and ctx.documents is None
        and q_len == k_len == ctx.semantic_ids.shape[-1]
        and query.dtype in (torch.float32, torch.float64)
    )


def dot_product_attention(
    ctx: HSAForwardContext,
    plan: MaskPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA over q' = [q, -(i - c)/s, 1/s] and k' = [k, λ_j, λ_j·(j - c)]: s·q'·k' = s·q·k - λ_j·(i - j),
    with s the softmax scale and c the middle position (it halves the largest term, so the cancellation costs half
    the bits). A padding key gets k' = [k, 0, -1e30]: masked, and still two extra dimensions (a third costs the CPU
    kernel ~15% at head dim 64: 67 is off its fast widths, 66 is not). v is zero-padded to the same width (SDPA's
    fused kernels want one head dimension) and the output cut back. λ_j are the pre-hook's per-key slopes, so a
    learnable λ gets its gradient through k'. O(N) memory: no L x L bias."""
    B, H, L, D = query.shape
    dv = value.shape[-1]
    scale = scaling if scaling is not None else D**-0.5
    span = ctx.span(L, key.shape[2])
    lam = ctx.key_slopes(span, H, query.device, query.dtype)  # (B, H|1, L)
    if lam.shape[1] > 1 and key.shape[1] != H:  # per-head slopes: one key row per query head
        key, value = repeat_kv(key, H // key.shape[1]), repeat_kv(value, H // key.shape[1])
    heads_k = key.shape[1]
    pos = torch.arange(L, device=query.device, dtype=query.dtype) - L // 2
    q_extra = torch.stack([-pos / scale, torch.ones_like(pos) / scale], dim=-1).expand(B, H, L, 2)
    lam = lam.expand(B, heads_k, L)
    term = lam * pos
    if plan.padding is not None:  # a padding key: λ_j = 0 and its second term the mask, so still two dimensions
        keep = plan.padding.to(query.device)[:, None, :].expand(B, heads_k, L)
        lam = lam * keep
        term = term.masked_fill(~keep, MASKED)
    k_extra = torch.stack([lam, term], dim=-1)
    q2 = torch.cat([query, q_extra], dim=-1)
    k2 = torch.cat([key, k_extra], dim=-1)
    v2 = F.pad(value, (0, q2.shape[-1] - dv))
    out = F.scaled_dot_product_attention(
        q2, k2, v2, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=heads_k != H
    )
    return out[..., :dv]


def auto_choice(device_type: str, dropout_in_training: bool, softcap: float | None):
    """flex on CUDA (unless the model trains with attention dropout, which flex lacks), else sdpa, or eager for
    soft-capped logits (sdpa has none)."""
    if device_type == "cuda" and not dropout_in_training:
        return hsa_flex_attention
    return hsa_eager_attention if softcap is not None else hsa_sdpa_attention


def hsa_auto_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """The backend `auto_choice` picks for this call."""
    attention = auto_choice(query.device.type, dropout > 0 and module.training, softcap)
    return attention(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap, **kwargs
    )


_FUNCTIONS = {
    "eager": hsa_eager_attention,
    "sdpa": hsa_sdpa_attention,
    "flex": hsa_flex_attention,
    "auto": hsa_auto_attention,
}


def register(backend: str) -> str:
    """Registers the backend's attention function and the HSA mask function under the same name (idempotent);
    returns the name."""
    if backend not in _FUNCTIONS:
        raise ValueError(f"hsa backend {backend!r}: use one of {', '.join(BACKENDS)}")
    name = implementation_name(backend)
    AttentionInterface.register(name, _FUNCTIONS[backend])
    AttentionMaskInterface.register(name, hsa_mask_plan)
    return name
