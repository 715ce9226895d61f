"""A preference pair (loader.Record with `rejected`) encoded as two samples that share their prompt token for token:
the chosen conversation, then the rejected one. Only each side's continuation trains (its assistant tokens, as
data.train_on says); the prompt is context. Truncation drops prompt turns only, the same ones on both sides (the
policy and the reference compare the two answers to one prompt), and never a continuation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hsa_train.data.tokenizer import Encoding
from hsa_train.data.truncate import FitInfo, fit
from hsa_train.types import IGNORE_INDEX


def continuation_only(encoding: Encoding, prompt_len: int) -> Encoding:
    """`encoding` with the labels of its first `prompt_len` messages' tokens (and of template text before them)
    ignored. Raises ValueError when nothing of the continuation trains."""
    labels = list(encoding.features["labels"])
    for t, message in enumerate(encoding.message_index):
        if message < prompt_len:
            labels[t] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError("nothing to prefer: a side's continuation has no trained token (data.train_on)")
    return encoding._replace(features={**encoding.features, "labels": labels})


def encode_pair(
    encode_detailed: Callable[[Sequence[dict[str, Any]], Any], Encoding],
    chosen: Sequence[dict[str, Any]],
    rejected: Sequence[dict[str, Any]],
    prompt_len: int,
    tools: Any,
    cutoff_len: int | None,
    fit_args: dict[str, Any],
) -> tuple[tuple[Encoding, Encoding] | None, FitInfo | None, list[int]]:
    """The two sides' encodings (None: overlong=drop dropped the pair), what truncation did (None without a
    cutoff; the pair counts once, as its longer side) and the indices of the prompt messages both kept.
    `fit_args`: truncate.fit's types_order, keep_types, overlong and default_type."""
    sides = (list(chosen), list(rejected))
    whole = list(range(prompt_len))
    if cutoff_len is None:
        encodings = tuple(continuation_only(encode_detailed(side, tools), prompt_len) for side in sides)
        return encodings, None, whole  # type: ignore[return-value]
    fits = [fit(encode_detailed, side, tools, cutoff_len, keep_from=prompt_len, **fit_args) for side in sides]
    infos = [info for _, info in fits]
    if any(encoding is None for encoding, _ in fits):
        return None, max(infos, key=lambda info: info.tokens_before), whole
    kept = [[i for i in info.kept if i < prompt_len] if info.kept is not None else whole for info in infos]
    prompt = sorted(set(kept[0]) & set(kept[1]))  # a prompt turn either side dropped goes from both
    encodings = []
    for (encoding, _), side, mine in zip(fits, sides, kept):
        if mine != prompt:
            encoding = encode_detailed([side[i] for i in prompt] + side[prompt_len:], tools)
            if len(encoding.features["input_ids"]) > cutoff_len:
                raise ValueError(
                    f"cannot fit in data.cutoff_len={cutoff_len}: with the prompt turns the other side dropped, a "
                    f"side still takes {len(encoding.features['input_ids'])} tokens; raise data.cutoff_len"
                )
        encodings.append(continuation_only(encoding, len(prompt)))
    info = max(infos, key=lambda info: (sum(info.turns_dropped.values()), info.tokens_before))
    if any(info.action == "truncated" for info in infos):
        after = max(len(e.features["input_ids"]) for e in encodings)
        tokens_before = max(info.tokens_before for info in infos)
        info = FitInfo(
            "truncated", tokens_before, after, prompt + list(range(prompt_len, len(sides[0]))), info.turns_dropped
        )
    return (encodings[0], encodings[1]), info, prompt
