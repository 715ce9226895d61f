"""Next-token loss as a sum over label tokens, so callers can normalise over any set of micro-batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsa_train.data.tokenizer import IGNORE_INDEX


def shifted(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..L-2 and the labels they predict (positions 1..L-1)."""
    return logits[:, :-1, :], batch["labels"][:, 1:]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in float32, 0 where the label is ignored."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
