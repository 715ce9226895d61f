"""What one forward pass of an HSA model carries to its attention layers.

The model's forward pre-hook turns the `semantic_ids` argument into an `HSAForwardContext`, which transformers
passes down to every attention call with the other keyword arguments. The per-token slopes are built there, in
the pre-hook; the materialised bias (or the flex block mask) on the first layer, which hands the same tensors to
the others, so they cost one build per forward and mask pattern, not one per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hsa_train.model.bias import Span, head_slopes, hsa_bias, key_decay, work_dtype
from hsa_train.model.debug import log_layer_once
from hsa_train.model.mask import MaskPlan
from hsa_train.model.mask import allowed as mask_allowed


class HSAForwardContext:
    """`semantic_ids` (B, T) types every token of the whole sequence: the cached ones and the `new_tokens` this
    forward feeds. `lambdas` is λ per type (T,) or per head and type (H, T), read by the model's pre-hook before
    any decoder layer runs: FSDP2 prepends its own pre-forward hook, so its parameters are gathered by then.

    Every op on λ happens here, in the pre-hook, outside any checkpointed layer: `token_slopes`, λ_h of every token
    (B, H|1, T) in the work dtype, which layers only slice (a cached result computed inside layer 0 would be missing
    from that layer's recomputation, and activation checkpointing refuses the difference). The one exception, the
    materialised bias, goes through `_HSABias`, which saves nothing. Nothing here reads data on the host."""

    def __init__(
        self,
        semantic_ids: torch.Tensor,
        lambdas: torch.Tensor,
        head_scaling: str,
        position_ids: torch.Tensor | None = None,
        *,
        num_heads: int | None = None,
        dtype: torch.dtype = torch.float32,
        new_tokens: int | None = None,
        cached: bool = False,
        debug_names: list[str] | None = None,
    ):
        if num_heads is None:  # callers outside the model (tests, benchmarks) may leave it to λ's shape
            if head_scaling != "none":
                raise ValueError(f"head_scaling={head_scaling!r} needs num_heads")
            num_heads = lambdas.shape[0] if lambdas.ndim == 2 else 1
        if lambdas.ndim == 2 and lambdas.shape[0] != num_heads:
            raise ValueError(
                f"hsa.learnable=per_head holds λ for {lambdas.shape[0]} heads, the model has {num_heads} attention "
                "heads"
            )
        self.semantic_ids = semantic_ids
        self.lambdas = lambdas
        self.head_scaling = head_scaling
        self.num_heads = num_heads
        self.new_tokens = new_tokens
        self.cached = cached
        self.debug_names = debug_names
        self.token_slopes = key_decay(
            semantic_ids, lambdas, head_slopes(num_heads, head_scaling, semantic_ids.device), work_dtype(dtype)
        )
        self.documents = documents_of(position_ids, semantic_ids) if not cached else None
        self._memo: dict[tuple, Any] = {}

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()` once per forward for `key`; later layers get the same object."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def span(self, q_len: int, k_len: int) -> Span:
        """Absolute positions of this call's queries (the last `q_len` tokens) and keys. Without a cache the keys
        are the whole sequence; with one, a sliding-window layer holds only the last keys and a static cache holds
        slots past the end."""
        total = self.semantic_ids.shape[-1]
        if (self.new_tokens is not None and q_len != self.new_tokens) or (not self.cached and k_len != total):
            raise ValueError(
                f"semantic_ids covers {total} tokens but attention spans {q_len} queries and {k_len} keys: HSA "
                "applies to the model's own token sequence (one type per token), not to a sub-module's"
            )
        if q_len > k_len or q_len > total:
            raise ValueError(f"attention has {q_len} queries over {k_len} keys and {total} typed tokens")
        return Span(q_start=total - q_len, q_len=q_len, k_start=max(total - k_len, 0), k_len=k_len)

    def key_types(self, span: Span, device: torch.device) -> torch.Tensor:
        """(B, K) type of every key of `span`; slots past the end (a static cache's, always masked) get type 0."""
        sem = self.semantic_ids.to(device)
        types = sem[:, span.k_start : span.k_start + span.k_len]
        if types.shape[-1] < span.k_len:
            types = torch.nn.functional.pad(types, (0, span.k_len - types.shape[-1]))
        return types

    def key_documents(self, span: Span, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Document index of the queries (B, Q) and keys (B, K) of a packed row, or None."""
        if self.documents is None:
            return None
        docs = self.documents.to(device)
        return docs[:, span.q_start : span.q_start + span.q_len], docs[:, span.k_start : span.k_start + span.k_len]

    def slopes(self, num_heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """λ (T,) or (H, T) and the head scaling m_h (or None), checked against this layer's query heads."""
        self._check_heads(num_heads)
        return self.lambdas, head_slopes(num_heads, self.head_scaling, device=device)

    def _check_heads(self, num_heads: int) -> None:
        """Per-head slopes (learned per head, or ALiBi-scaled) were built for the config's head count."""
        if num_heads != self.num_heads and (self.lambdas.ndim == 2 or self.head_scaling != "none"):
            raise ValueError(
                f"HSA was set up for {self.num_heads} attention heads (the model config's), this attention layer "
                f"has {num_heads} query heads"
            )

    def key_slopes(
        self, span: Span, num_heads: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """λ_h of every key of `span`, (B, H|1, K), in float32 (float64 for a float64 model): a slice of the
        pre-hook's `token_slopes` (O(N) memory); a static cache's slots past the end get 0 (they are masked)."""
        self._check_heads(num_heads)
        lam = self.token_slopes[:, :, span.k_start : span.k_start + span.k_len]
        if lam.shape[-1] < span.k_len:
            lam = torch.nn.functional.pad(lam, (0, span.k_len - lam.shape[-1]))
        return lam.to(device=device, dtype=work_dtype(dtype))

    def debug_layer(self, module, backend: str, query: torch.Tensor, key: torch.Tensor) -> None:
        """Under hsa.debug, the layer's bias statistics, logged the first time it runs."""
        if self.debug_names is None:
            return
        span = self.span(query.shape[2], key.shape[2])
        types = self.key_types(span, query.device)
        slopes = self.key_slopes(span, query.shape[1], query.device)
        log_layer_once(module, backend, types, slopes, span, self.debug_names)

    def attention_bias(
        self, attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The additive mask for this layer's (query, key): (B, H or 1, Q, K) in `dtype`."""
        q_len, k_len, num_heads = query.shape[2], key.shape[2], query.shape[1]
        per_head = self.head_scaling != "none" or self.lambdas.ndim == 2
        cache_key = ("bias", id(attention_mask), q_len, k_len, num_heads if per_head else 1, dtype, query.device)
        return self.memo(cache_key, lambda: self._build_bias(attention_mask, query, key, dtype))

    def _build_bias(self, attention_mask, query, key, dtype) -> torch.Tensor:
        span = self.span(query.shape[2], key.shape[2])
        lambdas, slopes = self.slopes(query.shape[1], query.device)
        allowed, additive = None, None
        if isinstance(attention_mask, MaskPlan):
            attention_mask = mask_allowed(attention_mask, query.device)
        if attention_mask is not None:
            if attention_mask.shape[-1] != span.k_len:
                raise ValueError(f"attention mask spans {attention_mask.shape[-1]} keys, attention spans {span.k_len}")
            if attention_mask.dtype == torch.bool:
                allowed = attention_mask
            else:
                additive = attention_mask
        docs = self.key_documents(span, query.device)
        if docs is not None:  # packed rows: a query sees only its own document, whatever the mask said
            same = (docs[0][:, :, None] == docs[1][:, None, :])[:, None]  # (B, 1, Q, K)
            if additive is not None:
                additive = additive.masked_fill(~same, torch.finfo(additive.dtype).min)
            else:
                if allowed is None:
                    qpos = torch.arange(span.q_start, span.q_start + span.q_len, device=query.device)
                    kpos = torch.arange(span.k_start, span.k_start + span.k_len, device=query.device)
                    allowed = (qpos[:, None] >= kpos[None, :])[None, None]
                allowed = allowed & same
        types = self.key_types(span, query.device)
        return hsa_bias(types, lambdas, allowed, span, dtype, slopes=slopes, additive_mask=additive)


def documents_of(position_ids: torch.Tensor | None, semantic_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) document index per token when full-length 2D `position_ids` are given (they restart inside a row
    where documents are packed), else None. transformers detects packing only without an attention mask and
    without a cache; the bias needs it always, since SPEC §3 promises that attention never crosses a document.
    Whether the ids restart is not asked (that would read data on the host in every forward): a row of one
    document is one document index. A decoding step's ids cover only the new tokens: no packing there."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[-1] != semantic_ids.shape[-1]:
        return None
    pos = position_ids.to(semantic_ids.device).expand(semantic_ids.shape[0], -1)
    starts = (pos[:, 1:] - pos[:, :-1]) != 1
    return torch.nn.functional.pad(starts.long().cumsum(-1), (1, 0))


def forward_context(kwargs: dict) -> HSAForwardContext:
    """The context the model's pre-hook put in the attention call's keyword arguments."""
    ctx = kwargs.get("hsa_context")
    if not isinstance(ctx, HSAForwardContext):
        raise RuntimeError(
            "HSA attention was called without its forward context: call the model enable_hsa() returned, "
            "passing semantic_ids=..., not one of its submodules"
        )
    return ctx
