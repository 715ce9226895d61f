"""HSA attention functions and their mask functions, registered with transformers under one name per backend.

transformers calls the mask function once per forward and mask pattern (it gets the padding mask and the causal /
sliding-window / packed-document pattern) and the attention function once per layer. For eager and sdpa the mask
function returns the boolean "may attend" mask, never None, so padding is never dropped, and the attention function
folds the HSA bias into it; for flex it returns a plan the attention turns into a block mask (`flex.py`). Either is
built on the first layer and reused by the others through the per-forward `HSAForwardContext`.

`auto` picks per call, from the device and the model: flex on CUDA, sdpa on CPU, eager where sdpa cannot serve
(logit soft-capping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from hsa_train.model.bias import work_dtype
from hsa_train.model.context import HSAForwardContext
from hsa_train.model.flex import FlexMaskPlan, hsa_flex_attention, hsa_flex_mask

BACKENDS = ("eager", "sdpa", "flex", "auto")


def implementation_name(backend: str) -> str:
    return f"hsa_{backend}"


def hsa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor:
    """(B, 1, Q, K) boolean: causal (or the model's pattern), padding and packed documents, always materialised."""
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device=device,
    )


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Key / value heads repeated to the query's head count (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def forward_context(kwargs: dict) -> HSAForwardContext:
    """The context the model's pre-hook put in the attention call's keyword arguments."""
    ctx = kwargs.get("hsa_context")
    if not isinstance(ctx, HSAForwardContext):
        raise RuntimeError(
            "HSA attention was called without its forward context: call the model enable_hsa() returned, "
            "passing semantic_ids=..., not one of its submodules"
        )
    return ctx


def _bias_and_full_heads(backend, module, query, key, value, attention_mask, kwargs, dtype) -> tuple[torch.Tensor, ...]:
    """This forward's bias in `dtype`, and key / value repeated to the query's head count (grouped-query
    attention)."""
    ctx = forward_context(kwargs)
    ctx.debug_layer(module, backend, query, key)
    bias = ctx.attention_bias(attention_mask, query, key, dtype)
    n_rep = query.shape[1] // key.shape[1]
    return bias, repeat_kv(key, n_rep), repeat_kv(value, n_rep)


def hsa_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: logits = q·kᵀ·scale (+ softcap), then + bias and the softmax in float32 (the bias is never
    rounded to a low-precision dtype: in bf16 a slope-0.01 bias at distance 8,000 would move in steps of 0.5)."""
    bias, key, value = _bias_and_full_heads(
        "eager", module, query, key, value, attention_mask, kwargs, work_dtype(query.dtype)
    )
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
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The bias (built once per forward, shared by heads when they share slopes) as SDPA's float mask, in the
    query's dtype (SDPA takes no other)."""
    if softcap is not None:
        raise ValueError(
            "hsa backend 'sdpa' does not support attention logit soft-capping (this model has it): use "
            "hsa.backend=auto, eager or flex"
        )
    bias, key, value = _bias_and_full_heads("sdpa", module, query, key, value, attention_mask, kwargs, query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def hsa_auto_mask(*args, device: torch.device | str = "cpu", **kwargs):
    """flex's plan on CUDA, the boolean mask elsewhere."""
    if torch.device(device).type == "cuda":
        return hsa_flex_mask(*args, device=device, **kwargs)
    return hsa_mask(*args, device=device, **kwargs)


def hsa_auto_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """flex where the mask step chose it (CUDA), else sdpa, or eager for soft-capped logits (sdpa has none)."""
    if isinstance(attention_mask, FlexMaskPlan):
        attention = hsa_flex_attention
    else:
        attention = hsa_eager_attention if softcap is not None else hsa_sdpa_attention
    return attention(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap, **kwargs
    )


_FUNCTIONS = {
    "eager": (hsa_eager_attention, hsa_mask),
    "sdpa": (hsa_sdpa_attention, hsa_mask),
    "flex": (hsa_flex_attention, hsa_flex_mask),
    "auto": (hsa_auto_attention, hsa_auto_mask),
}


def register(backend: str) -> str:
    """Registers the backend's attention and mask functions under the same name (idempotent); returns the name."""
    if backend not in _FUNCTIONS:
        raise ValueError(f"hsa backend {backend!r}: use one of {', '.join(BACKENDS)}")
    name = implementation_name(backend)
    attention, mask = _FUNCTIONS[backend]
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name
