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

    def __init__(self, semantic_ids: torch.Tensor, lambdas: torch.Tensor, head_scaling: str):
        self.semantic_ids = semantic_ids
        self.lambdas = lambdas
        self.head_scaling = head_scaling
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
        bias = hsa_bias(sem, self.lambdas, allowed, q_len, query.dtype, slopes=slopes, additive_mask=additive)
        self._cache[cache_key] = bias
        return bias
