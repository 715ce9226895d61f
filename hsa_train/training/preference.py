"""Preference losses over sequence log-probabilities: DPO's sigmoid loss (with label smoothing, the "conservative"
DPO of Mitchell 2023) and IPO's squared loss, on the summed log-probs of each side's trained tokens, as TRL
computes them. A batch holds the chosen sides first, then the rejected ones, pair k at rows k and n + k."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsa_train.model.hsa import HSALambdas
from hsa_train.training.distributed import unwrap
from hsa_train.training.step import Objective
from hsa_train.types import IGNORE_INDEX, PREFERENCE_LOSSES, check_choice


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label) over the trained tokens (next-token: logits[:, t] predict labels[:, t + 1])
    in float32, and how many tokens that is. Rows with no trained token give 0 and 0."""
    targets = labels[:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def logps_with_reference(forward, reference, batch: dict[str, torch.Tensor]):
    """(policy's summed log-probs per row, their token counts, the reference's): the reference's from the batch
    when precomputed (`reference_logps`, training.reference), else run now without gradient; None when there is
    neither. Both forwards run on a filler batch too: under FSDP each is a collective."""
    logps, tokens = sequence_logps(forward(batch), batch["labels"])
    ref = batch.get("reference_logps")
    if ref is None and reference is not None:
        with torch.no_grad():
            ref = reference(batch)
    return logps, tokens, ref


def nested(stats: dict) -> dict:
    """Statistics named `group/key` as {group: {key: value}}; names without a group stay as they are."""
    out: dict = {}
    for name, value in stats.items():
        group, _, key = name.rpartition("/")
        if group:
            out.setdefault(group, {})[key] = value
        else:
            out[name] = value
    return out


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
    check_choice("stage.loss", loss, PREFERENCE_LOSSES)
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return PreferenceTerms(losses, chosen_rewards, rejected_rewards)


class PreferenceLoss(Objective):
    """DPO as a step objective (step.optimizer_step): a batch holds n chosen sides then their n rejected sides
    (pipeline.PairPool), the unit a step's loss is the mean over is the pair, and it reports the implicit rewards,
    the accuracy (chosen reward above rejected), the margin and each side's summed log-prob, as TRL names them.

    `reference(batch)`: the reference model's summed log-probs per row, computed without gradient (the frozen
    starting point: `adapters_off` for LoRA runs, `frozen_copy` for full fine-tuning); None when every batch
    brings them (`reference_logps`, precomputed: training.reference)."""

    unit = "preference pairs"
    stat_names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "logps/chosen",
        "logps/rejected",
    )
    shown = ("rewards/accuracy", "rewards/margin")

    def __init__(self, reference, beta: float, label_smoothing: float = 0.0, loss: str = "sigmoid"):
        check_choice("stage.loss", loss, PREFERENCE_LOSSES)  # at construction, before the first step
        self.reference, self.beta, self.label_smoothing, self.loss = reference, beta, label_smoothing, loss

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch.get("pairs", 0))  # dataset.pair_batch; a filler batch holds none

    def __call__(self, forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = self.count(batch)
        logps, tokens, ref = logps_with_reference(forward, self.reference, batch)
        if n == 0:  # a filler batch (a rank with fewer eval pairs): both forwards ran, so ranks step together
            return logps.sum() * 0.0, [torch.zeros(()) for _ in self.stat_names]
        ref = ref.to(logps.device, torch.float32)
        if self.loss == "ipo":  # IPO compares log-probs averaged over each side's tokens
            per, ref_per = logps / tokens.clamp(min=1), ref / tokens.clamp(min=1)
        else:
            per, ref_per = logps, ref
        chosen_rows, rejected_rows = slice(0, n), slice(n, 2 * n)  # rows after 2n: a collator's filler
        terms = preference_loss(
            per[chosen_rows], per[rejected_rows], ref_per[chosen_rows], ref_per[rejected_rows],
            self.beta, self.label_smoothing, self.loss,
        )  # fmt: skip
        chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
        stats = [
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
            logps[chosen_rows].detach().sum(),
            logps[rejected_rows].detach().sum(),
        ]
        return terms.losses.sum(), stats

    def evaluate(self, forward, make_batches, reduce) -> dict:
        """Held-out pairs (`make_batches()`: this rank's batches), summed over the ranks by `reduce`:
        summarize_preference's dict."""
        return summarize_preference(reduce(preference_eval_sums(self, forward, make_batches())))


@torch.no_grad()
def preference_eval_sums(objective: Objective, forward, batches) -> list[float]:
    """The summed loss, the number of units (pairs, labelled samples) and the sums of the objective's statistics
    over `batches` (dataset.pair_eval_batches): sums, so ranks can add theirs up."""
    sums = [0.0] * (2 + len(objective.stat_names))
    for batch in batches:
        loss, stats = objective(forward, batch)
        for k, value in enumerate([loss, objective.count(batch), *stats]):
            sums[k] += float(value)
    return sums


def summarize_preference(sums: list[float]) -> dict:
    """{"loss", "pairs", "rewards": {chosen, rejected, accuracy, margin}, "logps": {chosen, rejected}}: means over
    the pairs (None without pairs) from `preference_eval_sums`."""
    loss, pairs, *stats = sums
    means = {name: value / pairs if pairs else None for name, value in zip(PreferenceLoss.stat_names, stats)}
    return {"loss": loss / pairs if pairs else math.nan, "pairs": int(pairs), **nested(means)}


def adapters_off(model, forward):
    """The reference of a LoRA run: the same model with its adapters disabled (no second copy in memory) and HSA's
    learnable λ at their starting values (they train beside the adapters, so the base alone is not the start)."""
    peft_model = unwrap(model)
    lambdas = [m for m in peft_model.modules() if isinstance(m, HSALambdas) and m.learnable]
    start = [m.raw.detach().clone() for m in lambdas]

    def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        now, training = [m.raw.detach().clone() for m in lambdas], peft_model.training
        try:
            for m, value in zip(lambdas, start):
                m.raw.data.copy_(value)
            peft_model.eval()  # no dropout in the reference
            with peft_model.disable_adapter():
                return sequence_logps(forward(batch), batch["labels"])[0]
        finally:
            peft_model.train(training)
            for m, value in zip(lambdas, now):
                m.raw.data.copy_(value)

    return reference


def frozen_copy(ref_forward):
    """The reference of a full fine-tuning run: a frozen copy of the starting model, through its own forward
    (step.make_forward over the copy)."""

    def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logps(ref_forward(batch), batch["labels"])[0]

    return reference
