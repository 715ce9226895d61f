"""Preference losses over sequence log-probabilities: DPO's sigmoid loss (with label smoothing, the "conservative"
DPO of Mitchell 2023) and IPO's squared loss, on the summed log-probs of each side's trained tokens, as TRL
computes them. A batch holds the chosen sides first, then the rejected ones, pair k at rows k and n + k."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsa_train.types import IGNORE_INDEX

PREFERENCE_LOSSES = ("sigmoid", "ipo")  # dpo.loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label) over the trained tokens (next-token: logits[:, t] predict labels[:, t + 1])
    in float32, and how many tokens that is. Rows with no trained token give 0 and 0."""
    targets = labels[:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


@dataclass
class PreferenceTerms:
    """Per pair: the loss, and the implicit rewards β·(log π - log π_ref) of each side."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss: str = "sigmoid",
) -> PreferenceTerms:
    """The per-pair loss from each side's log-prob under the policy and the reference (for IPO, the log-probs
    averaged over each side's tokens, as IPO defines them and TRL passes them).

    sigmoid: -(1 - ε) log σ(β h) - ε log σ(-β h), h = (π_c - π_r) - (ref_c - ref_r); ipo: (h - 1 / (2β))²."""
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"dpo.loss={loss!r}: choose one of {', '.join(PREFERENCE_LOSSES)}")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return PreferenceTerms(losses, chosen_rewards, rejected_rewards)
