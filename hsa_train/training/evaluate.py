"""Held-out evaluation: loss overall and per semantic type of the predicted token, and exact match of the final
answer.

Exact match is teacher-forced greedy decoding: a sample counts when, at every token of its final answer, the most
likely next token given the true prefix is the true token. The answer (`SemanticTokenizer.encode_with_answer`) is
the last assistant turn's tokens after its generation prompt up to and including its end-of-turn token, the one
generation stops at; the template's text after that token (ChatML's "\n") is trained but never generated, so it is
not scored. A sample counts then exactly when greedy generation from the answer's prompt tokens reproduces the
answer and stops there, so it needs one forward per sample and no KV cache. (A template that ends turns in plain
text has no such token: its answer is the whole turn, and generation may go on after it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

from hsa_train.data.collator import SemanticCollator
from hsa_train.model.generation import generate_batch
from hsa_train.model.vision import image_runs, images_by_row
from hsa_train.training import distributed as D
from hsa_train.training.loss import next_token_targets, shift_left, token_losses
from hsa_train.types import IGNORE_INDEX

# The sums `eval_sums` returns after the per-type ones, in this order (all ranks add theirs up).
ANSWER_SUMS = ("answers", "answers_exact", "answer_tokens", "answer_tokens_correct")


@torch.no_grad()
def eval_sums(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    n_types: int,
) -> list[float]:
    """Summed loss per type, label-token count per type, then the ANSWER_SUMS, over `batches` (`forward(batch)`
    returns logits; a batch's optional `answer_span` (B, 2) holds each row's final-answer span [start, end), -1 for
    none, ending with the end-of-turn token). Sums, not means, so ranks can add theirs up."""
    loss_sum = torch.zeros(n_types, dtype=torch.float64)
    count = torch.zeros(n_types, dtype=torch.float64)
    answer = torch.zeros(len(ANSWER_SUMS), dtype=torch.float64)
    for batch in batches:
        targets = next_token_targets(batch)
        logits = forward(batch)
        losses = token_losses(logits, targets).double().cpu()
        types = shift_left(batch["semantic_ids"], 0)  # the type of each predicted token
        keep = targets != IGNORE_INDEX
        loss_sum += torch.bincount(types[keep], weights=losses[keep], minlength=n_types)
        count += torch.bincount(types[keep], minlength=n_types).double()
        spans = batch.get("answer_span")
        if spans is not None:
            predicted = logits.argmax(-1).cpu()  # predicted[:, t] is the guess for token t + 1
            for row, (start, end) in enumerate(spans.tolist()):
                if start < 1:
                    continue
                correct = predicted[row, start - 1 : end - 1] == batch["input_ids"][row, start:end]
                answer += torch.tensor([1, bool(correct.all()), end - start, int(correct.sum())], dtype=torch.float64)
    return loss_sum.tolist() + count.tolist() + answer.tolist()


def summarize(sums: list[float], type_names: list[str]) -> dict:
    """{"loss", "tokens", "loss_per_type", "tokens_per_type", "exact_match", "answer_token_accuracy", "answers"}
    from `eval_sums` (None for a type with no tokens, and for the answer metrics when no sample had an answer)."""
    n = len(type_names)
    loss_sum, count = sums[:n], sums[n : 2 * n]
    answers, exact, answer_tokens, answer_correct = sums[2 * n : 2 * n + len(ANSWER_SUMS)]
    total = sum(count)
    return {
        "loss": sum(loss_sum) / total if total else math.nan,
        "tokens": int(total),
        "loss_per_type": {name: (loss_sum[i] / count[i] if count[i] else None) for i, name in enumerate(type_names)},
        "tokens_per_type": {name: int(count[i]) for i, name in enumerate(type_names)},
        "exact_match": exact / answers if answers else None,
        "answer_token_accuracy": answer_correct / answer_tokens if answer_tokens else None,
        "answers": int(answers),
    }


@torch.no_grad()
def generated_answer_sums(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    collator: SemanticCollator,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    synced: bool = False,
) -> list[float]:
    """ANSWER_SUMS by real decoding (`eval.generate=true`): each row's prompt (its tokens before the final answer)
    left-padded, `generate` greedy with the KV cache (and the bias) for as many tokens as the answer has, scored
    against it: exact when every generated token is the answer's, token accuracy position by position. Greedy
    decoding from the true prompt reproduces a teacher-forced exact answer token for token, so exact match is
    the teacher-forced one, now measured the way the model is used. `collator`: the batches' (its pads, and its
    filler sample); `synced`: ranks step together (FSDP): a rank whose prompts hold no image also decodes the
    collator's filler (unscored), so every rank's first step runs the vision tower."""
    pad_values = collator.pad_values
    answer = torch.zeros(len(ANSWER_SUMS), dtype=torch.float64)
    for batch in batches:
        spans = [(r, s, e) for r, (s, e) in enumerate(batch["answer_span"].tolist()) if s >= 1]
        score = bool(spans)
        if not score:  # a filler batch, or no answers: one token, one step, so ranks still step together
            spans = [(0, 1, 2)]
        prompts = [
            {"input_ids": batch["input_ids"][r, :s].tolist(), "semantic_ids": batch["semantic_ids"][r, :s].tolist()}
            for r, s, _ in spans
        ]
        if "image_grid_thw" in batch:  # each prompt with the images among its tokens
            config = D.unwrap(model).config
            rows = images_by_row(config, batch)
            for prompt, (r, s, _) in zip(prompts, spans):
                pixels, grids = rows[r]
                k = image_runs(config, batch["input_ids"][r, :s])
                if k:
                    prompt["pixel_values"] = pixels[: int(grids[:k].prod(dim=1).sum())]
                    prompt["image_grid_thw"] = grids[:k]
        if synced and collator.image_filler is not None and not any("image_grid_thw" in p for p in prompts):
            filler = collator.image_filler
            prompts.append({k: torch.as_tensor(v) for k, v in filler.items() if k != "labels"})
        new_tokens = max(e - s for _, s, e in spans)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            outs = generate_batch(
                model, prompts, pad_values["input_ids"], pad_values["semantic_ids"],
                max_new_tokens=new_tokens, do_sample=False, synced_gpus=synced,
            )  # fmt: skip
        if not score:
            continue
        for (r, s, e), out in zip(spans, outs):
            generated = torch.tensor(out[: e - s] + [pad_values["input_ids"]] * (e - s - len(out[: e - s])))
            correct = generated == batch["input_ids"][r, s:e]
            answer += torch.tensor([1, bool(correct.all()), e - s, int(correct.sum())], dtype=torch.float64)
    return answer.tolist()
