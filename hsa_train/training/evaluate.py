"""Held-out loss, overall and per semantic type of the predicted token."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from hsa_train.data.tokenizer import IGNORE_INDEX
from hsa_train.training.loss import next_token_targets, shift_left, token_losses


@torch.no_grad()
def loss_sums(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    n_types: int,
) -> tuple[list[float], list[float]]:
    """Summed loss and label-token count per type over `batches` (`forward(batch)` returns logits). Sums, not
    means, so ranks can add theirs up."""
    loss_sum = torch.zeros(n_types, dtype=torch.float64)
    count = torch.zeros(n_types, dtype=torch.float64)
    for batch in batches:
        targets = next_token_targets(batch)
        losses = token_losses(forward(batch), targets).double().cpu()
        types = shift_left(batch["semantic_ids"], 0)  # the type of each predicted token
        keep = targets != IGNORE_INDEX
        loss_sum += torch.bincount(types[keep], weights=losses[keep], minlength=n_types)
        count += torch.bincount(types[keep], minlength=n_types).double()
    return loss_sum.tolist(), count.tolist()


def summarize(loss_sum: list[float], count: list[float], type_names: list[str]) -> dict:
    """{"loss", "tokens", "loss_per_type", "tokens_per_type"} from per-type sums (None for a type with no tokens)."""
    total = sum(count)
    return {
        "loss": sum(loss_sum) / total if total else math.nan,
        "tokens": int(total),
        "loss_per_type": {n: (loss_sum[i] / count[i] if count[i] else None) for i, n in enumerate(type_names)},
        "tokens_per_type": {n: int(count[i]) for i, n in enumerate(type_names)},
    }
