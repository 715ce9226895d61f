"""The reference model's log-probs of every pair, computed once before training (stage.precompute_reference) and
kept in the data cache: a full fine-tuning run then holds no frozen copy and runs no reference forward per step.

A table is keyed by what its numbers depend on: the starting model's weights (every parameter and buffer, the
bias's λ among them), the precision they are computed in, and the pairs' tokens, labels and types. A resumed run
builds its starting model again before it loads the checkpoint, so it finds the same table."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hsa_train.data.collator import SemanticCollator
from hsa_train.data.dataset import pair_batch
from hsa_train.data.store import Sample, update_digest
from hsa_train.training import distributed as D
from hsa_train.training.preference import sequence_logps


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every named parameter and buffer of `model`, names and bytes."""
    h = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        t = tensor.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pairs_digest(pairs: Sequence[tuple[Sample, Sample]]) -> str:
    h = hashlib.sha256()
    for chosen, rejected in pairs:
        update_digest(h, chosen.features)
        update_digest(h, rejected.features)
    return h.hexdigest()


@torch.no_grad()
def compute_table(
    forward, pairs: Sequence[tuple[Sample, Sample]], batch_size: int, collator: SemanticCollator, info: D.DistInfo
) -> np.ndarray:
    """(len(pairs), 2) float32: each pair's chosen and rejected summed log-probs under `forward` (the starting
    model, not yet wrapped: no collective per forward), rank r computing pairs r, r + world, ..., then shared.
    For labelled samples (KTO), each sample's and its KL sample's."""
    mine = pairs[info.rank :: info.world]
    out = np.zeros((len(mine), 2), dtype=np.float32)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        batch, n = pair_batch(collator, chunk), len(chunk)
        logps = sequence_logps(forward(batch), batch["labels"])[0].float().cpu().numpy()
        if "kl" in batch:  # labelled samples (KTO): the samples' rows; their KL samples are a batch of their own
            second = sequence_logps(forward(batch["kl"]), batch["kl"]["labels"])[0].float().cpu().numpy()[:n]
        else:  # pairs: the chosen rows, then the rejected ones
            second = logps[n : 2 * n]
        out[start : start + n, 0], out[start : start + n, 1] = logps[:n], second
    table = np.zeros((len(pairs), 2), dtype=np.float32)
    for rank, part in enumerate(D.all_gather(out, info)):
        table[rank :: info.world] = part
    return table


def reference_table(
    forward,
    pairs: Sequence[tuple[Sample, Sample]],
    model_key: str,
    batch_size: int,
    collator: SemanticCollator,
    info: D.DistInfo,
    device: torch.device,
    root: Path | None,
) -> tuple[np.ndarray, bool]:
    """The table of `pairs` (compute_table), from `root` (the data cache; None: no cache) when a run computed it
    before, else computed and, by rank 0, written there. Returns (table, whether it came from the cache).
    `model_key`: the starting model and precision (weights_digest and the autocast dtype)."""
    key = hashlib.sha256(f"{model_key}|{pairs_digest(pairs)}".encode()).hexdigest()
    path = root / "reference" / f"{key}.npy" if root is not None else None
    # rank 0 decides: ranks that saw the file at different moments would disagree on computing (a collective)
    found = D.all_reduce_sum([float(info.is_main and path is not None and path.is_file())], device, info)[0] > 0
    if found:  # the data cache is on a file system every rank sees, as the prepared datasets are
        return np.load(path), True
    table = compute_table(forward, pairs, batch_size, collator, info)
    if path is not None and info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # written whole, then renamed into place
        np.save(tmp, table)
        tmp.replace(path)
    D.barrier(info)
    return table, False
