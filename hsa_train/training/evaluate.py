"""Held-out loss, overall and per semantic type of the predicted token."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from hsa_train.data.tokenizer import IGNORE_INDEX
from hsa_train.training.loss import shifted, token_losses


@torch.no_grad()
def evaluate(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    type_names: list[str],
) -> dict:
    """`forward(batch)` returns logits. Returns {"loss", "tokens", "loss_per_type", "tokens_per_type"}."""
    n_types = len(type_names)
    loss_sum = torch.zeros(n_types, dtype=torch.float64)
    count = torch.zeros(n_types, dtype=torch.float64)
    for batch in batches:
        logits = forward(batch)
        logits, labels = shifted(logits, batch)
        losses = token_losses(logits, labels.to(logits.device)).double().cpu()
        labels = labels.cpu()
        types = batch["semantic_ids"][:, 1:].cpu()
        keep = labels != IGNORE_INDEX
        loss_sum += torch.bincount(types[keep], weights=losses[keep], minlength=n_types)
        count += torch.bincount(types[keep], minlength=n_types).double()
    total = float(count.sum())
    per_type = {name: (float(loss_sum[i] / count[i]) if count[i] > 0 else None) for i, name in enumerate(type_names)}
    return {
        "loss": float(loss_sum.sum() / total) if total else math.nan,
        "tokens": int(total),
        "loss_per_type": per_type,
        "tokens_per_type": {name: int(count[i]) for i, name in enumerate(type_names)},
    }
