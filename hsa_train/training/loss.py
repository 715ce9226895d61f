"""Next-token loss as a sum over label tokens, so callers can normalise over any set of micro-batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsa_train.types import IGNORE_INDEX


def shift_left(values: torch.Tensor, fill: int) -> torch.Tensor:
    """values[:, 1:] padded back to full length with `fill`: position t then holds what logits[:, t] predict.
    Shifting the targets (B x L) instead of slicing the logits (B x L x V) spares a full copy of the logits."""
    return F.pad(values[:, 1:], (0, 1), value=fill)


def next_token_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return shift_left(batch["labels"], IGNORE_INDEX)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in float32 (B, L), 0 where the target is ignored."""
    vocab = logits.shape[-1]
    targets = targets.to(logits.device)
    return F.cross_entropy(
        logits.float().view(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy over the non-ignored targets, in float32 (what training needs: no per-token
    vector to keep for backward)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits.float().view(-1, vocab),
        targets.to(logits.device).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
