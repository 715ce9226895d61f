"""`hsa.debug=true`: what the bias does, logged once per attention layer, and the types checked on every batch.

The statistics come from the per-key slopes and the distances alone (no attention weights, no L x L tensor), over
the causal pairs of each row: how many keys of each type, their λ, the mean bias a key of that type receives,
the share of its pairs faded below -10 (weight under e^-10 of an unbiased key) and its half-weight distance ln 2 / λ.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
from torch import nn

from hsa_train.model.bias import Span
from hsa_train.model.settings import HSASettings

log = logging.getLogger("hsa_train.hsa_debug")

_LOGGED: weakref.WeakSet = weakref.WeakSet()


def check_batch(model: nn.Module, semantic_ids: torch.Tensor, kwargs: dict, input_ids: torch.Tensor | None) -> None:
    """Padding (attention_mask 0) must carry the default type: anything else means the types are shifted against
    the tokens, or padded on the other side."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape != semantic_ids.shape:
        return
    settings = HSASettings.of(model)
    default = settings.semantic_types.default_id
    bad = (mask.to(semantic_ids.device) == 0) & (semantic_ids != default)
    if bool(bad.any()):
        row = int(bad.any(dim=-1).nonzero()[0])
        raise ValueError(
            f"hsa.debug: row {row} has {int(bad[row].sum())} padding positions (attention_mask 0) typed other than "
            f"{settings.default_type}: semantic_ids are not aligned with input_ids (shifted, or padded on the other "
            "side); pad them with SemanticCollator"
        )
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[-1] > semantic_ids.shape[-1]:
        raise ValueError(
            f"hsa.debug: input_ids has {input_ids.shape[-1]} tokens, semantic_ids {semantic_ids.shape[-1]}"
        )


def log_layer_once(
    module: nn.Module, backend: str, types: torch.Tensor, slopes: torch.Tensor, span: Span, names
) -> None:
    """One line per attention layer, the first time it runs: `slopes` (B, H|1, K) are λ_h of every key."""
    if module in _LOGGED:
        return
    _LOGGED.add(module)
    kpos = torch.arange(span.k_start, span.k_start + span.k_len, device=types.device)
    last = span.q_start + span.q_len - 1
    seen = (last - kpos + 1).clamp_min(0).float()  # queries at or after each key (causal, whole row)
    lam = slopes.detach().float().mean(dim=1)  # (B, K), mean over heads
    parts = []
    for t, name in enumerate(names):
        of_type = types == t
        n_keys = int(of_type.sum())
        if not n_keys:
            continue
        lam_t = lam[of_type]
        n = seen.expand_as(types)[of_type]
        pairs = n.sum().clamp_min(1.0)
        bias_sum = (lam_t * n * (n - 1) / 2).sum()
        cut = torch.where(lam_t > 0, 10.0 / lam_t.clamp_min(1e-12), torch.full_like(lam_t, float("inf")))
        faded = (n - torch.floor(cut) - 1).clamp_min(0).sum()
        mean_lam = float(lam_t.mean())
        half = f"{math.log(2) / mean_lam:.0f}" if mean_lam > 0 else "never"
        parts.append(
            f"{name}: {n_keys} keys, λ {mean_lam:.4g}, mean bias {-float(bias_sum / pairs):.3g}, "
            f"faded {float(faded / pairs):.1%}, half-weight at {half} tokens"
        )
    layer = getattr(module, "layer_idx", None)
    where = f"layer {layer}" if layer is not None else type(module).__name__
    log.info(
        "hsa.debug %s (%s): %d queries over keys %d..%d; %s",
        where,
        backend,
        span.q_len,
        span.k_start,
        span.k_start + span.k_len - 1,
        "; ".join(parts),
    )
