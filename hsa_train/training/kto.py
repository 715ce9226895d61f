"""KTO (Ethayarajh et al. 2024) as a step objective: unpaired samples, each labelled desirable or not, each pushed
above or below a baseline, the policy's drift from the reference measured on mismatched samples (a prompt with
another record's completion: the KL samples prepare.py builds beside every labelled one).

The baseline is one number per step: the mean over the *whole global batch* of the KL samples' log-prob ratio
(policy minus reference, no gradient), clamped at 0. It is computed before the step's first backward (`begin`),
summed over every micro-batch and rank, so a step's gradient does not depend on how its samples are split, as
for the other objectives (TRL averages it over one micro-batch gathered across devices, which does)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hsa_train.training.preference import logps_with_reference, nested, preference_eval_sums
from hsa_train.training.step import Objective


@dataclass
class KTOTerms:
    """Per sample: the weighted loss, and the implicit reward β·(log π - log π_ref)."""

    losses: torch.Tensor
    rewards: torch.Tensor


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOTerms:
    """desirable: w_d (1 - σ(β (r - z))); undesirable: w_u (1 - σ(β (z - r))), r = log π - log π_ref of the
    sample's completion, z the step's KL baseline (>= 0, no gradient)."""
    ratio = policy - reference
    wanted = torch.where(desirable, ratio - kl, kl - ratio)
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(ratio.dtype)
    return KTOTerms(weights * (1 - torch.sigmoid(beta * wanted)), beta * ratio.detach())


class KTOLoss(Objective):
    """A batch (dataset.labelled_batch) holds n labelled samples, their labels (`desirable`) and, in `kl`, the
    batch of their KL samples. The unit a step's loss is the mean over is the labelled sample.

    Statistics, as TRL names them: rewards and log-probs of the desirable (chosen) and undesirable (rejected)
    samples, each a mean over its own class; the margin between the two means; the KL baseline; `accuracy`, the
    share of samples on their label's side of it (reward above β·z when desirable, below when not); and how many
    of each class the step held. `reference(batch)`: the reference's summed log-probs per row, as for DPO; None
    when every batch brings them (`reference_logps`, precomputed)."""

    unit = "labelled samples"
    stat_names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "count/chosen",
        "count/rejected",
        "kl",
    )
    shown = ("rewards/accuracy", "kl")

    def __init__(self, reference, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.reference, self.beta = reference, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.kl = 0.0

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch.get("pairs", 0))  # a filler batch holds none

    @torch.no_grad()
    def begin(self, forward, micro_batches, reduce) -> None:
        """The step's KL baseline over every micro-batch of every rank (`reduce` sums over ranks)."""
        total, rows = 0.0, 0
        for batch in micro_batches:
            n = self.count(batch)
            kl_batch = batch.get("kl", batch)  # a filler batch: its one row, for the collectives
            logps, _, ref = logps_with_reference(forward, self.reference, kl_batch)
            if n:
                total += float((logps[:n].float() - ref[:n].to(logps.device, torch.float32)).sum())
                rows += n
        total, rows = reduce([total, float(rows)])
        self.kl = max(total / rows, 0.0) if rows else 0.0

    def __call__(self, forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = self.count(batch)
        logps, _, ref = logps_with_reference(forward, self.reference, batch)
        if n == 0:
            return logps.sum() * 0.0, [torch.zeros(()) for _ in self.stat_names]
        logps, ref = logps[:n], ref[:n].to(logps.device, torch.float32)  # rows after n: a collator's filler
        desirable = batch["desirable"][:n].to(logps.device)
        terms = kto_loss(logps, ref, desirable, self.kl, self.beta, self.desirable_weight, self.undesirable_weight)
        undesirable, rewards, threshold = ~desirable, terms.rewards, self.beta * self.kl
        right = torch.where(desirable, rewards > threshold, rewards < threshold)
        stats = [
            rewards[desirable].sum(),
            rewards[undesirable].sum(),
            right.float().sum(),
            logps[desirable].detach().sum(),
            logps[undesirable].detach().sum(),
            desirable.sum().float(),
            undesirable.sum().float(),
            torch.tensor(self.kl * n),
        ]
        return terms.losses.sum(), stats

    def means(self, sums: list[float], n_units: float) -> dict[str, float | None]:
        """Each class's rewards and log-probs over its own samples (None when the batch held none of it), the
        margin between the classes' mean rewards, the accuracy and KL over all samples, the class counts."""
        s = dict(zip(self.stat_names, sums))
        chosen, rejected = s["count/chosen"], s["count/rejected"]

        def mean(value: float, n: float) -> float | None:
            return value / n if n else None

        out: dict[str, float | None] = {
            "rewards/chosen": mean(s["rewards/chosen"], chosen),
            "rewards/rejected": mean(s["rewards/rejected"], rejected),
            "rewards/accuracy": mean(s["rewards/accuracy"], n_units),
            "logps/chosen": mean(s["logps/chosen"], chosen),
            "logps/rejected": mean(s["logps/rejected"], rejected),
            "count/chosen": chosen,
            "count/rejected": rejected,
            "kl": mean(s["kl"], n_units),
        }
        both = out["rewards/chosen"] is not None and out["rewards/rejected"] is not None
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"] if both else None
        return out

    @torch.no_grad()
    def evaluate(self, forward, make_batches, reduce) -> dict:
        """Held-out labelled samples: the KL baseline over all of them (every rank's), then the loss and statistics
        with it. `make_batches()` gives this rank's batches afresh (the same ones twice). {"loss", "samples", "kl",
        "rewards": {chosen, rejected, accuracy, margin}, "logps": {chosen, rejected}, "count": {chosen, rejected}}."""
        self.begin(forward, make_batches(), reduce)
        loss, samples, *stats = reduce(preference_eval_sums(self, forward, make_batches()))
        out = {"loss": loss / samples if samples else math.nan, "samples": int(samples)}
        out.update(nested(self.means(stats, samples)))
        out["count"] = {k: int(v) for k, v in out["count"].items()}
        return out
