"""Truncation to `data.cutoff_len` that knows what matters (issue 9): whole turns go, by semantic type, and the
conversation is rendered again, so a cut never falls inside a message or a template's special tokens.

Turns
    A turn starts at a user message, and at an assistant message that follows a tool result (the next round of
    an agent loop: one task, then many call / result rounds without a user message between them); it runs until
    the next start, so a tool call and its results stay together. The messages before the first user message (a
    leading system prompt) form a group of their own that follows the same rules. A conversation without a user
    message or tool result is one group.

What a turn is worth
    A message counts as its most important type among its own `semantic_type` and its spans' types (types go from
    most to least important in the types list: GLOBAL_CONDITION, KEY_EVENT, PROCESS_NOISE by default); a turn
    counts as its most important message.

What stays
    - every turn holding a message that carries one of `keep_types` (its own type or a span's; default
      GLOBAL_CONDITION);
    - the last turn holding an assistant message: its reply is what trains (no assistant message at all:
      "nothing to train").

What goes
    The other turns, least important first: by type in the reverse order of the types list (PROCESS_NOISE turns,
    then KEY_EVENT turns), oldest first within a type, until the rest fits. Turns dropped early that fit again
    once a later (more important) turn had to go are put back, most important first: the kept set is the most
    important one that fits (a less important turn survives only where no more important turn could use its
    room), and no more turns are dropped than that order needs.

`fit` applies this to one conversation given an `encode_detailed` callable (SemanticTokenizer.encode_detailed):
token counts per message come from a first encode; the kept messages are encoded again, and where rendering them
shifts a few tokens (a template's preamble, merges at the seams) the next turn goes, within a bounded loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hsa_train.types import DEFAULT_KEEP_TYPES, DEFAULT_TYPE, DEFAULT_TYPES, IGNORE_INDEX, OVERLONG, check_choice


class Turn(NamedTuple):
    messages: list[int]  # indices into the conversation, in order
    rank: int  # index in the types list of its most important type (0 = most important)
    keep: bool  # holds a keep_types message or the last assistant reply


def message_types(message: Mapping[str, Any], default_type: str) -> list[str]:
    """The type names a message carries: its own (`default_type` when None) and its non-empty spans'. A span is
    (start, end, type name) or {"start", "end", "semantic_type"}, as SemanticTokenizer reads it."""
    names = [message.get("semantic_type") or default_type]
    for span in message.get("spans") or ():
        if isinstance(span, Mapping):
            start, end, name = span.get("start"), span.get("end"), span.get("semantic_type")
        else:
            start, end, name = span
        if start is None or end is None or start < end:  # an empty span types nothing (as in the tokenizer)
            names.append(name or default_type)
    return names


def split_turns(messages: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Message indices grouped in turns (see the module docstring): a new group at every user message and at an
    assistant message after a tool result; what precedes the first user message is a group of its own."""
    groups: list[list[int]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        next_round = role == "assistant" and i > 0 and messages[i - 1].get("role") == "tool"
        if not groups or role == "user" or next_round:
            groups.append([])
        groups[-1].append(i)
    return groups


def describe_turn(turn: list[int]) -> str:
    return f"message {turn[0]}" if len(turn) == 1 else f"messages {turn[0]}-{turn[-1]}"


def turns_of(
    messages: Sequence[Mapping[str, Any]],
    types_order: Sequence[str] = DEFAULT_TYPES,
    keep_types: Sequence[str] = DEFAULT_KEEP_TYPES,
    default_type: str | None = None,
    keep_from: int | None = None,
) -> list[Turn]:
    """The conversation's turns with their rank and whether they must stay (`keep_from`: every turn holding a
    message at or after that index stays too: a preference pair's continuation). Raises ValueError for an unknown
    type name and for a conversation without an assistant message."""
    types_order = list(types_order)
    default_type = default_type or (DEFAULT_TYPE if DEFAULT_TYPE in types_order else types_order[-1])
    unknown_keep = [t for t in keep_types if t not in types_order]
    if unknown_keep:
        raise ValueError(f"data.keep_types: unknown types {unknown_keep} (known: {', '.join(types_order)})")
    keep_set = set(keep_types)
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last_assistant is None:
        raise ValueError("nothing to train: the conversation has no assistant message (truncation keeps the last)")
    turns = []
    for group in split_turns(messages):
        ranks, keep = [], last_assistant in group or (keep_from is not None and group[-1] >= keep_from)
        for i in group:
            names = message_types(messages[i], default_type)
            for name in names:
                if name not in types_order:
                    raise ValueError(f"message {i}: unknown semantic_type {name!r} (known: {', '.join(types_order)})")
            ranks.extend(types_order.index(name) for name in names)
            keep = keep or any(name in keep_set for name in names)
        turns.append(Turn(group, min(ranks), keep))
    return turns


def drop_order(turns: Sequence[Turn]) -> list[int]:
    """Indices of the droppable turns, the first to go first: least important type first (the reverse of the
    types list), oldest first within a type."""
    return sorted((t for t in range(len(turns)) if not turns[t].keep), key=lambda t: (-turns[t].rank, t))


def window_noise(
    messages: Sequence[Mapping[str, Any]],
    keep_last: int,
    types_order: Sequence[str] = DEFAULT_TYPES,
    keep_types: Sequence[str] = DEFAULT_KEEP_TYPES,
    default_type: str | None = None,
) -> tuple[list[int], int]:
    """Observation masking (`data.noise_window`): (the indices of the messages to keep, the turns dropped). Of
    the turns whose most important type is the least important type (PROCESS_NOISE by default), only the newest
    `keep_last` stay; a turn that must stay (keep_types, the last assistant turn) is never dropped and counts
    toward the newest. Agent-memory studies find that dropping old observations keeps most of the accuracy at a
    fraction of the tokens: the context an agent sees at its last turn, bounded however long the episode."""
    if keep_last < 0:
        raise ValueError(f"data.noise_window={keep_last} must be >= 0 or null")
    turns = turns_of(messages, types_order, keep_types, default_type)
    noise = len(list(types_order)) - 1
    newest = [t for t in range(len(turns)) if turns[t].rank == noise][::-1]
    gone = {t for t in newest[keep_last:] if not turns[t].keep}
    return [i for t, turn in enumerate(turns) if t not in gone for i in turn.messages], len(gone)


def plan_truncation(
    messages: Sequence[Mapping[str, Any]],
    tokens_per_message: Sequence[int],
    other_tokens: int,
    cutoff_len: int,
    types_order: Sequence[str] = DEFAULT_TYPES,
    keep_types: Sequence[str] = DEFAULT_KEEP_TYPES,
    default_type: str | None = None,
    keep_from: int | None = None,
) -> list[int]:
    """The indices of the messages to keep so that `other_tokens + sum(tokens_per_message[kept]) <= cutoff_len`
    (see the module docstring for the policy). `tokens_per_message[i]`: the tokens of message i's segment;
    `other_tokens`: the tokens of no message. Raises ValueError with a one-line reason when even the messages that
    must stay do not fit."""
    if len(tokens_per_message) != len(messages):
        raise ValueError(f"tokens_per_message has {len(tokens_per_message)} entries for {len(messages)} messages")
    turns = turns_of(messages, types_order, keep_types, default_type, keep_from)
    size = [sum(tokens_per_message[i] for i in turn.messages) for turn in turns]
    total = other_tokens + sum(size)
    if total <= cutoff_len:
        return list(range(len(messages)))
    order = drop_order(turns)
    dropped: list[int] = []
    for t in order:
        dropped.append(t)
        total -= size[t]
        if total <= cutoff_len:
            break
    if total > cutoff_len:
        raise ValueError(cannot_fit(messages, turns, total, cutoff_len, keep_types))
    for t in reversed(dropped[:-1]):  # put back what fits again, most important first
        if total + size[t] <= cutoff_len:
            total += size[t]
            dropped.remove(t)
    gone = set(dropped)
    return [i for t, turn in enumerate(turns) if t not in gone for i in turn.messages]


def cannot_fit(messages, turns: Sequence[Turn], needed: int, cutoff_len: int, keep_types: Sequence[str]) -> str:
    kept = [describe_turn(turn.messages) for turn in turns if turn.keep]
    if len(kept) > 6:
        kept = [*kept[:5], f"... {len(kept) - 5} more"]
    return (
        f"cannot fit in data.cutoff_len={cutoff_len}: the turns that must stay ({', '.join(kept)}: every "
        f"{'/'.join(keep_types) or 'kept-type'} message and the last assistant turn) need {needed} tokens; raise "
        f"data.cutoff_len or mark fewer messages {'/'.join(keep_types) or 'as kept'}"
    )


# -- one conversation, end to end ---------------------------------------------------------------------------------
@dataclass
class FitInfo:
    """What `fit` did to one conversation."""

    action: str  # "fits" (as it was), "truncated", "dropped" (overlong=drop)
    tokens_before: int
    tokens_after: int  # 0 when dropped
    kept: list[int] | None = None  # the kept message indices (truncated only)
    turns_dropped: dict[str, int] = field(default_factory=dict)  # per type name (a turn's most important type)


def fit(
    encode_detailed: Callable[[Sequence[Mapping[str, Any]], Any], Any],
    messages: Sequence[Mapping[str, Any]],
    tools: Any,
    cutoff_len: int,
    types_order: Sequence[str] = DEFAULT_TYPES,
    keep_types: Sequence[str] = DEFAULT_KEEP_TYPES,
    overlong: str = "truncate",
    default_type: str | None = None,
    max_rounds: int = 8,
    keep_from: int | None = None,
) -> tuple[Any | None, FitInfo]:
    """Encodes the conversation to at most `cutoff_len` tokens: (encoding, info), or (None, info) when it is too
    long and `overlong="drop"`. `encode_detailed(messages, tools)` returns an Encoding (`.features` with
    input_ids / labels / ..., `.message_index`: per token its message, -1 for none).

    overlong="error" raises on a conversation that is too long; "truncate" drops whole turns (`plan_truncation`)
    and encodes the kept messages again; if that render is still over (a template may change a few tokens when
    turns go), the budget shrinks by the excess and the plan is made again, at most `max_rounds` times.
    Raises ValueError when the sample cannot be made to fit or has nothing to train after truncation.
    A truncated sample's encoding is that of the kept messages: its `message_index` counts in `info.kept`
    (`info.kept[j]` is the original index of the encoding's message j). `keep_from`: the messages from this index
    on always stay (a preference pair's continuation)."""
    check_choice("data.overlong", overlong, OVERLONG)
    if cutoff_len < 1:
        raise ValueError(f"data.cutoff_len={cutoff_len} must be >= 1")
    encoding = encode_detailed(messages, tools)
    before = len(encoding.features["input_ids"])
    if before <= cutoff_len:
        return encoding, FitInfo("fits", before, before)
    if overlong == "error":
        raise ValueError(
            f"too long: {before} tokens > data.cutoff_len={cutoff_len} (set data.overlong=truncate or drop, or "
            "raise data.cutoff_len)"
        )
    if overlong == "drop":
        return None, FitInfo("dropped", before, 0)

    counts = Counter(encoding.message_index)
    tokens_per_message = [counts.get(i, 0) for i in range(len(messages))]
    other = counts.get(-1, 0)
    budget, tried, after = cutoff_len, {}, before
    for _ in range(max_rounds):
        try:
            kept = plan_truncation(
                messages, tokens_per_message, other, budget, types_order, keep_types, default_type, keep_from
            )
        except ValueError:
            if budget == cutoff_len:
                raise
            raise ValueError(
                f"cannot fit in data.cutoff_len={cutoff_len}: rendered again without the dropped turns, the sample "
                f"still takes {after} tokens and nothing more may go; raise data.cutoff_len or mark fewer messages "
                f"{'/'.join(keep_types)}"
            ) from None
        key = tuple(kept)
        if key not in tried:
            try:
                tried[key] = encode_detailed([messages[i] for i in kept], tools)
            except ValueError as exc:
                if not str(exc).startswith("nothing to train"):
                    raise
                raise ValueError(f"nothing to train after truncation to data.cutoff_len={cutoff_len}: {exc}") from None
        encoding = tried[key]
        after = len(encoding.features["input_ids"])
        if after <= cutoff_len:
            break
        budget -= after - cutoff_len  # the render grew by this much: plan for that much less
    else:
        raise ValueError(
            f"cannot fit in data.cutoff_len={cutoff_len}: after dropping turns the render still has {after} tokens "
            f"({max_rounds} rounds); raise data.cutoff_len"
        )
    if all(label == IGNORE_INDEX for label in encoding.features["labels"]):
        raise ValueError(
            f"nothing to train after truncation to data.cutoff_len={cutoff_len}: no kept token has a label"
        )
    turns = turns_of(messages, types_order, keep_types, default_type, keep_from)
    kept_set = set(kept)
    dropped = Counter(list(types_order)[t.rank] for t in turns if t.messages[0] not in kept_set)
    return encoding, FitInfo("truncated", before, after, kept, dict(dropped))


# -- counts over a dataset ----------------------------------------------------------------------------------------
@dataclass
class TruncationReport:
    """Counts over many `fit` calls; reports from workers merge (`merge`, `+`, `from_dict`)."""

    seen: int = 0
    truncated: int = 0
    dropped: int = 0  # overlong=drop: samples left out
    failed: int = 0  # samples that could not be fitted (skipped under on_error=skip)
    turns_dropped: Counter = field(default_factory=Counter)  # per type name
    tokens_seen: int = 0  # before truncation
    tokens_truncated: int = 0  # removed from truncated samples
    tokens_dropped: int = 0  # in samples dropped whole
    turns_masked: int = 0  # noise turns left out by data.noise_window (observation masking), before any cut

    def add(self, info: FitInfo) -> None:
        self.seen += 1
        self.tokens_seen += info.tokens_before
        if info.action == "truncated":
            self.truncated += 1
            self.tokens_truncated += info.tokens_before - info.tokens_after
            self.turns_dropped.update(info.turns_dropped)
        elif info.action == "dropped":
            self.dropped += 1
            self.tokens_dropped += info.tokens_before

    def add_failure(self) -> None:
        self.seen += 1
        self.failed += 1

    def merge(self, other: TruncationReport) -> TruncationReport:
        counts = ("seen", "truncated", "dropped", "failed", "tokens_seen", "tokens_truncated", "tokens_dropped")
        for name in (*counts, "turns_masked"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.turns_dropped.update(other.turns_dropped)
        return self

    def __add__(self, other: TruncationReport) -> TruncationReport:
        return TruncationReport.from_dict(self.as_dict()).merge(other)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "failed": self.failed,
            "turns_dropped": dict(self.turns_dropped),
            "tokens_seen": self.tokens_seen,
            "tokens_truncated": self.tokens_truncated,
            "tokens_dropped": self.tokens_dropped,
            "turns_masked": self.turns_masked,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TruncationReport:
        values = dict(values)
        values["turns_dropped"] = Counter(values.get("turns_dropped") or {})
        return cls(**values)

    def summary(self) -> str:
        turns = ", ".join(f"{n} {name}" for name, n in sorted(self.turns_dropped.items())) or "none"
        return (
            f"truncation: {self.seen} samples, {self.truncated} truncated ({self.tokens_truncated} tokens, turns "
            f"dropped: {turns}), {self.dropped} dropped as overlong ({self.tokens_dropped} tokens), "
            f"{self.failed} could not fit"
            + (f"; {self.turns_masked} old noise turns masked (data.noise_window)" if self.turns_masked else "")
        )
