"""Query, key and value as every HSA kernel takes them: one dtype under autocast, and key / value heads repeated
to the query's count where a kernel wants them full (grouped-query attention)."""

from __future__ import annotations

import torch


def kernel_inputs(query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in one dtype: the autocast dtype when autocast is on (rotary embeddings hand over float32 q / k
    while v comes out of a bf16 matmul), else as they came."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Key / value heads repeated to the query's head count (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
