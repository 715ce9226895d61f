"""HSA attention functions and their mask function, registered with transformers under one name per backend.

transformers calls the mask function once per forward (it gets the padding mask and the causal / packed-document
pattern) and the attention function once per layer. The mask function returns the boolean "may attend" mask,
never None, so padding is never dropped; the attention function folds the HSA bias into it. The bias is built on
the first layer and reused by the others through the per-forward `HSAForwardContext`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from hsa_train.model.context import HSAForwardContext

BACKENDS = ("eager", "sdpa")


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


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _bias_and_full_heads(query, key, value, attention_mask, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This forward's bias (from the context the model's pre-hook put in kwargs), and key / value repeated to
    the query's head count (grouped-query attention)."""
    ctx = kwargs.get("hsa_context")
    if not isinstance(ctx, HSAForwardContext):
        raise RuntimeError(
            "HSA attention was called without its forward context: call the model enable_hsa() returned, "
            "passing semantic_ids=..., not one of its submodules"
        )
    bias = ctx.attention_bias(attention_mask, query, key)
    n_rep = query.shape[1] // key.shape[1]
    return bias, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)


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
    """The reference: logits = q·kᵀ·scale (+ softcap) + bias, softmax in float32."""
    bias, key, value = _bias_and_full_heads(query, key, value, attention_mask, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + bias
    weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
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
    """The bias (built once per forward, shared by heads when they share slopes) as SDPA's float mask."""
    if softcap is not None:
        raise ValueError("hsa backend 'sdpa' does not support attention logit softcapping; use hsa.backend=eager")
    bias, key, value = _bias_and_full_heads(query, key, value, attention_mask, kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_FUNCTIONS = {"eager": hsa_eager_attention, "sdpa": hsa_sdpa_attention}


def register(backend: str) -> str:
    """Registers the backend's attention and mask functions under the same name (idempotent); returns the name."""
    if backend not in _FUNCTIONS:
        raise ValueError(f"hsa backend {backend!r}: use one of {BACKENDS + ('auto',)}")
    name = implementation_name(backend)
    AttentionInterface.register(name, _FUNCTIONS[backend])
    AttentionMaskInterface.register(name, hsa_mask)
    return name
