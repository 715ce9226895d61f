"""One optimizer step, usable on its own: forward and backward over this rank's micro-batches with the loss
normalised over the whole global batch, the global loss and gradient norm, clipping, the non-finite guard, the
update and the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from hsa_train.model.vision import vision_inputs
from hsa_train.training import distributed as D
from hsa_train.training.loss import label_count, next_token_targets, token_loss_sum


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient; nothing was updated or saved."""


def make_forward(model, device: torch.device, autocast_dtype: torch.dtype | None, use_hsa: bool):
    """batch -> logits, on `device`, under autocast when asked; semantic_ids go in only when HSA is on.

    A packed batch (PackedCollator: it carries `position_ids`) goes in with its position ids and no attention
    mask: transformers finds the documents from the restarting positions only without a mask (and without a
    cache: masking_utils._preprocess_mask_arguments / find_packed_sequence_indices) and confines attention to
    each, the padding tail being a document of its own; HSA's bias is confined by the same position ids
    (model.context.documents_of). The batch's attention_mask then only counts tokens."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "position_ids" in batch:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if use_hsa:
            inputs["semantic_ids"] = batch["semantic_ids"]
        inputs.update(vision_inputs(model, batch))  # images: pixels, grids, token kinds, packed rope positions
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            return model(**inputs, use_cache=False).logits

    return forward


class Objective:
    """What a step minimises: `__call__(forward, batch)` gives a micro-batch's loss summed over its units (`count`)
    and the sums of its statistics (`stat_names`); the step divides by the units of the whole global batch.
    TokenLoss here; preference.PreferenceLoss (DPO: pairs) and kto.KTOLoss (labelled samples)."""

    unit = "units"
    stat_names: tuple[str, ...] = ()
    shown: tuple[str, ...] = ()  # the statistics the console's step line shows

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def __call__(self, forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def begin(self, forward, micro_batches: list[dict[str, torch.Tensor]], reduce) -> None:
        """Before the step's first backward, over all of this rank's micro-batches: where the loss needs a number
        of the whole global batch (KTO's KL baseline). `reduce(values)` sums floats over the ranks; every rank
        calls it together. Nothing for the others."""

    def means(self, sums: list[float], n_units: float) -> dict[str, float | None]:
        """The step's statistics from their sums over the global batch: means over its units."""
        return {name: value / n_units for name, value in zip(self.stat_names, sums)}


class TokenLoss(Objective):
    """Supervised fine-tuning: next-token cross-entropy summed over the label tokens. The unit a step's loss is the
    mean over is the label token; it reports no statistics besides the loss."""

    unit = "label tokens"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def __call__(self, forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return token_loss_sum(forward(batch), next_token_targets(batch)), []


TOKEN_LOSS = TokenLoss()


def accumulate_gradients(
    forward,
    micro_batches: list[dict[str, torch.Tensor]],
    n_units: int,
    scale: float = 1.0,
    sync=None,
    objective=TOKEN_LOSS,
) -> tuple[float, int, list[float]]:
    """Backward over this rank's micro-batches of one step, each loss divided by `n_units`, the objective's units
    (label tokens, or pairs) of the *whole* global batch (all ranks, all micro-batches), so the step's gradient is
    the mean over its units however the samples are split. `scale` undoes the averaging DDP / FSDP apply over
    ranks; `sync(last)` gives the context that skips gradient synchronisation before the last micro-batch.
    Returns (this rank's share of the step's mean loss, its data tokens: not padding, not a blank image row, and
    its sums of the objective's statistics)."""
    if n_units == 0:
        raise ValueError(f"the batch has no {objective.unit}")
    loss_sum, n_tokens = 0.0, 0
    stats = [0.0] * len(objective.stat_names)
    for k, batch in enumerate(micro_batches):
        with sync(k == len(micro_batches) - 1) if sync else nullcontext():
            total, sums = objective(forward, batch)
            loss = total / n_units
            (loss * scale).backward()
        loss_sum += loss.item()
        stats = [a + float(b) for a, b in zip(stats, sums)]
        n_tokens += int(batch["attention_mask"].sum()) - int(batch.get("filler_tokens", 0))  # data tokens only
    return loss_sum, n_tokens, stats


@dataclass
class StepResult:
    loss: float  # mean over the objective's units of the global batch (label tokens, or pairs)
    grad_norm: float
    lr: float  # the lr this step used
    tokens: int  # non-padding input tokens of the global batch
    skipped: bool  # non-finite, update skipped (train.skip_nonfinite)
    stop: bool  # some rank was signalled to stop: all of them checkpoint and stop after this step
    stats: dict[str, float | None] = field(default_factory=dict)  # the objective's statistics (Objective.means)


def optimizer_step(
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    micro_batches: list[dict[str, torch.Tensor]],
    info: D.DistInfo,
    device: torch.device,
    *,
    step: int,
    max_grad_norm: float | None,
    skip_nonfinite: bool,
    where: Callable[[], list[str]],
    stop_signal: int = 0,
    objective=TOKEN_LOSS,
) -> StepResult:
    """Step `step` over this rank's `micro_batches` of the global batch. `where()` names the samples (file:line)
    for the non-finite error; `stop_signal` (non-zero once this rank got SIGTERM / SIGINT) rides on the label
    count's all-reduce, so every rank learns of it in the same step."""
    sync = (lambda last: D.set_gradient_sync(model, info, last)) if info.mode != "none" else None
    units = sum(objective.count(b) for b in micro_batches)
    n_units, stop = D.all_reduce_sum([units, float(stop_signal)], device, info)
    objective.begin(forward, micro_batches, lambda values: D.all_reduce_sum(values, device, info))
    local_loss, n_tokens, sums = accumulate_gradients(forward, micro_batches, int(n_units), info.world, sync, objective)
    loss, n_tokens, *sums = D.all_reduce_sum([local_loss, n_tokens, *sums], device, info)
    stats = objective.means(sums, n_units)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    lr = scheduler.get_last_lr()[0]
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if not finite and not skip_nonfinite:
        raise NonFiniteError(
            f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
            f"(loss={loss}, grad_norm={grad_norm}) on samples {gather_wheres(where(), info)}; "
            "stopped without updating or saving the model (train.skip_nonfinite=true skips such steps)"
        )
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, lr, int(n_tokens), not finite, bool(stop), stats)


def gather_wheres(wheres: list[str], info: D.DistInfo) -> list[str]:
    """Every rank's sample locations (only on the failure path, where all ranks arrive together)."""
    if info.world == 1:
        return wheres
    import torch.distributed as dist

    everyone: list[list[str] | None] = [None] * info.world
    dist.all_gather_object(everyone, wheres)
    return [w for part in everyone for w in (part or [])]


@dataclass
class Progress:
    """What training adds up step by step; checkpointed (as plain data) with the model."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    skipped_steps: int = 0
    train_time: float = 0.0  # seconds spent in steps (for tokens/s over a resumed run too)
    stats: dict[str, list[float | None]] = field(default_factory=dict)  # the objective's statistics, step by step

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses = int(state["step"]), [float(x) for x in state["losses"]]
        self.tokens_seen, self.skipped_steps = int(state["tokens_seen"]), int(state["skipped_steps"])
        self.train_time = float(state.get("train_time", 0.0))
        stats = state.get("stats", {})  # None: a step without that statistic (KTO: no sample of a class)
        self.stats = {name: [None if x is None else float(x) for x in values] for name, values in stats.items()}
