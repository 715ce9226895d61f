"""The mask step of every HSA backend: a `MaskPlan` of the pattern, built on the host from shapes alone.

transformers calls the mask function once per forward and mask pattern. HSA's returns what it was told (the mask
function transformers composed, the offsets, the 2D padding mask) without reading any data: no host sync, nothing
L x L yet. Each backend turns the plan into what its kernel takes, once per forward (the context memoises it):
eager and sdpa a boolean "may attend" mask (`allowed`), or nothing at all on the sdpa dot-product route (causal,
no cache, no packing: `attention.dot_product_route`); flex a BlockMask (`flex.block_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers.masking_utils import causal_mask_function, sdpa_mask


@dataclass(eq=False)
class MaskPlan(BlockMask):
    """The attention pattern of one mask step in absolute positions: `mask_function(b, h, q, kv)` as transformers
    composed it (causal, sliding window, chunks, packed sequences it detected), the 2D padding mask (B, K) as
    given, and where this call's queries and keys start (ints; tensors under a static cache, never read on the
    host).

    It is a BlockMask only in type (no BlockMask state): transformers passes a 4-D BlockMask through its mask
    step untouched, which is what a mask prepared before the forward needs (generate with a static cache)."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: Any
    kv_offset: Any
    mask_function: Any
    padding: torch.Tensor | None
    use_vmap: bool = False  # transformers asks for it with custom (or / and) mask functions

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def causal(self) -> bool:
        """The plain causal pattern (no sliding window, no chunks, no packing transformers found)."""
        return self.mask_function is causal_mask_function


def hsa_mask_plan(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> MaskPlan:
    """The mask function registered for every HSA backend: records the pattern (no data read)."""
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)
    return MaskPlan(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=_snapshot(q_offset),
        kv_offset=_snapshot(kv_offset),
        mask_function=mask_function or causal_mask_function,
        padding=padding,
        use_vmap=use_vmap,
    )


def _snapshot(offset: Any) -> Any:
    """A static cache's offset is its token counter, which each layer's cache update bumps in place: the plan
    keeps a copy (a device op, no sync) of the value it had at the mask step."""
    return offset.clone() if isinstance(offset, torch.Tensor) else offset


def allowed(plan: MaskPlan, device: torch.device) -> torch.Tensor:
    """(B, 1, Q, K) boolean: the plan's pattern AND padding, materialised (transformers' own sdpa mask builder,
    never skipping to `is_causal`, so padding is never dropped)."""
    padding = plan.padding.to(device) if plan.padding is not None else None
    return sdpa_mask(
        batch_size=plan.batch_size,
        q_length=plan.q_length,
        kv_length=plan.kv_length,
        q_offset=plan.q_offset,
        kv_offset=plan.kv_offset,
        mask_function=plan.mask_function,
        attention_mask=padding,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=plan.use_vmap,
        device=device,
    )
