"""What one forward pass of an HSA model carries to its attention layers.

The model's forward pre-hook turns the `semantic_ids` argument into an `HSAForwardContext`, which transformers
passes down to every attention call with the other keyword arguments. The context builds the bias on the first
layer and hands the same tensor to the others, so the bias costs one build per forward, not one per layer.
"""

from __future__ import annotations

import torch

from hsa_train.model.bias import head_slopes, hsa_bias


class HSAForwardContext:
    """`lambdas` is λ per type, read by the model's pre-hook before any decoder layer runs: FSDP2 prepends its own
    pre-forward hook, so its parameters are gathered by then, and no op on λ happens inside a checkpointed layer
    (a cached result computed there would be missing from that layer's recomputation)."""

    def __init__(
        self,
        semantic_ids: torch.Tensor,
        lambdas: torch.Tensor,
        head_scaling: str,
        position_ids: torch.Tensor | None = None,
    ):
        self.semantic_ids = semantic_ids
        self.lambdas = lambdas
        self.head_scaling = head_scaling
        self.documents = documents_of(position_ids, semantic_ids)
        self._cache: dict[tuple, torch.Tensor] = {}

    def attention_bias(
        self, attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor:
        """The additive mask for this layer's (query, key): (B, H or 1, Q, K) in the query's dtype."""
        q_len, k_len, num_heads = query.shape[2], key.shape[2], query.shape[1]
        slopes_heads = num_heads if self.head_scaling != "none" else 1
        cache_key = (id(attention_mask), q_len, k_len, slopes_heads, query.dtype, query.device)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        sem = self.semantic_ids
        if sem.shape[-1] != k_len:
            raise ValueError(
                f"semantic_ids covers {sem.shape[-1]} tokens but attention spans {k_len} keys: pass one type per "
                "token of the whole sequence"
            )
        sem = sem.to(query.device)
        slopes = head_slopes(num_heads, self.head_scaling, device=query.device)
        allowed, additive = None, None
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                allowed = attention_mask
            else:
                additive = attention_mask
            mask_k = attention_mask.shape[-1]
            if mask_k != k_len:
                raise ValueError(f"attention mask spans {mask_k} keys, attention spans {k_len}")
        if self.documents is not None:  # packed rows: a query sees only its own document, whatever the mask said
            docs = self.documents.to(query.device)
            same = (docs[:, -q_len:, None] == docs[:, None, :])[:, None]  # (B, 1, Q, K)
            if additive is not None:
                additive = additive.masked_fill(~same, torch.finfo(query.dtype).min)
            else:
                if allowed is None:
                    qpos = torch.arange(k_len - q_len, k_len, device=query.device)
                    allowed = (qpos[:, None] >= torch.arange(k_len, device=query.device)[None, :])[None, None]
                allowed = allowed & same
        bias = hsa_bias(sem, self.lambdas, allowed, q_len, query.dtype, slopes=slopes, additive_mask=additive)
        self._cache[cache_key] = bias
        return bias


def documents_of(position_ids: torch.Tensor | None, semantic_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, K) document index per token when `position_ids` restart inside a row (packed documents), else None.
    transformers detects packing only without an attention mask and without a cache; the bias needs it always,
    since SPEC §3 promises that attention never crosses a document. Only full-length 2D position ids are read
    (a decoding step's cover only the new tokens: no packing there)."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[-1] != semantic_ids.shape[-1]:
        return None
    pos = position_ids.to(semantic_ids.device).expand(semantic_ids.shape[0], -1)
    starts = (pos[:, 1:] - pos[:, :-1]) != 1
    if not bool(starts.any()):
        return None
    return torch.nn.functional.pad(starts.long().cumsum(-1), (1, 0))
