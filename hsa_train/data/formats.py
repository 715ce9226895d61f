"""Dataset formats: one small function per format turns a raw record into `(messages, tools)`.

- `messages` (OpenAI style): `{"messages": [{"role", "content", ...}], "tools": [...]}`; `content` is a string or
  a list of text parts (`{"type": "text", "text": ...}`, or LLaMA-Factory v1's `{"type": "text", "value": ...}`);
  a part may carry its own `semantic_type` (a span of the joined content). Assistant messages may carry OpenAI
  `tool_calls`; role `tool` holds tool results.
- `sharegpt` (LLaMA-Factory): `{"conversations": [{"from", "value"}], "system": ..., "tools": ...}` with the tags
  human, gpt, system, function_call (an assistant tool call, its value JSON), observation (a tool result).
- `alpaca` (LLaMA-Factory): `instruction` (+ "\n" + `input` when not empty), `output`, optional `system` and
  `history` ([instruction, response] pairs before it).

Column names and role tags come from the dataset's spec (like LLaMA-Factory's dataset_info.json). Each message
comes out as `{"role", "content", "semantic_type"}` (the explicit type or None), plus `spans` [(start, end, type)]
and `tool_calls` [{"type": "function", "function": {"name", "arguments": dict}}] when there are any. A key the
format does not read, carrying data, is an error naming it unless it is in `ignore_keys` (nothing is dropped
silently). Problems are ValueErrors with a short reason before the first colon (the skip report groups by it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple

from hsa_train.data.parts import (
    EMPTY,
    IMAGE_PLACEHOLDER,
    MEDIA_PHRASE,
    FormatContext,
    Message,
    assistant_parts,
    attach_images,
    content_of,
    explicit_type,
    ignore_set,
    parse_json,
    parse_tools,
    tool_calls_of,
    unused_keys,
    with_reasoning,
)
from hsa_train.data.spec import DatasetSpec
from hsa_train.types import SemanticTypes

__all__ = [
    "IMAGE_PLACEHOLDER",
    "FormatContext",
    "Labelled",
    "Pair",
    "convert_alpaca",
    "convert_conversation",
    "ignore_set",
    "make_converter",
]

_MESSAGE_KEYS = ("semantic_type", "tool_calls", "loss_weight", "reasoning_content")
Converter = Callable[[Any], tuple[list[Message], list[dict[str, Any]] | None]]


def make_converter(spec: DatasetSpec, types: SemanticTypes, ignore_keys: Iterable[str] = ("id",)) -> Converter:
    """The format function of `spec`, bound to its columns, tags and the run's types: record -> (messages, tools)."""
    ctx = FormatContext(spec.format, dict(spec.columns), dict(spec.tags), types, ignore_set(ignore_keys))
    if spec.labelled:
        return partial(convert_labelled, ctx=ctx)
    return partial(convert_pair if spec.ranking else FORMAT_FUNCTIONS[spec.format], ctx=ctx)


def _format_hint(obj: Mapping[str, Any], fmt: str) -> str:
    if "conversations" in obj and fmt != "sharegpt":
        return "; it looks like ShareGPT ('conversations'): set format: sharegpt for this dataset"
    if "instruction" in obj and fmt != "alpaca":
        return "; it looks like alpaca ('instruction'): set format: alpaca for this dataset"
    if "messages" in obj and fmt != "messages":
        return "; it looks like OpenAI messages ('messages'): set format: messages for this dataset"
    return ""


def _record_keys(obj: Mapping[str, Any], ctx: FormatContext) -> None:
    """Audio and video columns with data are errors; other keys the format does not read are refused unless
    ignored."""
    for key in ("videos", "audios"):
        col = ctx.columns.get(key)
        if col and obj.get(col) not in EMPTY:
            what = "audio" if key == "audios" else "video"
            raise ValueError(f"{what} not supported: the record has {key} in column {col!r}; {MEDIA_PHRASE[what]}")
    used = {col for col in ctx.columns.values() if col}
    unused_keys(obj, used, ctx.ignore, "the record")


def _system(obj: Mapping[str, Any], ctx: FormatContext) -> str | None:
    col = ctx.columns.get("system")
    value = obj.get(col) if col else None
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"non-string column: {col!r} (system) is a {type(value).__name__}, expected text")
    return value


def _function_turn(k: int, raw: Any, ctx: FormatContext) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn: its value is JSON {"name", "arguments"} (or a list of them)."""
    if isinstance(raw, str):
        raw = parse_json(
            raw,
            f"tool call not JSON: message {k} ({ctx.tags['function_tag']}) has a value that is not JSON",
            '; give {"name": ..., "arguments": {...}}',
        )
    return tool_calls_of(k, raw, ctx)


def _loss_weight(k: int, role: str, weight: Any) -> None:
    """LLaMA-Factory v1's per-message loss_weight: accepted where it says what the roles say anyway."""
    if weight is None:
        return
    expected = 1.0 if role == "assistant" else 0.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or float(weight) != expected:
        raise ValueError(
            f"loss weight: message {k} ({role}) has loss_weight {weight!r}; per-message loss weights other than "
            "role-based are not supported (assistant 1, other roles 0); data.train_on decides what trains"
        )


def _turn(k: int, msg: Any, ctx: FormatContext) -> Message:
    if not isinstance(msg, dict):
        raise ValueError(f"malformed message {k}: expected an object, got {type(msg).__name__}")
    role_key, content_key = ctx.tags["role_tag"], ctx.tags["content_tag"]
    tag = msg.get(role_key)
    role = ctx.role_of.get(tag) if isinstance(tag, str) else None
    if role is None:
        raise ValueError(f"unknown role: message {k} has {role_key} {tag!r} (known: {', '.join(ctx.role_of)})")
    raw = msg.get(content_key)
    calls = None
    images: list[Any] = []
    reasoning, part_calls = None, []
    if role == "assistant":  # reasoning and tool-call parts (LLaMA-Factory v1), or OpenAI's reasoning_content
        raw, reasoning, part_calls = assistant_parts(k, raw, ctx)
        said = msg.get("reasoning_content")
        if said not in EMPTY:
            if reasoning is not None or not isinstance(said, str):
                raise ValueError(f"malformed reasoning: message {k} needs one reasoning, as text (parts or key)")
            reasoning = (said, None)
    elif msg.get("reasoning_content") not in EMPTY:
        raise ValueError(f"malformed reasoning: message {k} ({role}) has reasoning_content; only assistants reason")
    if role == "function":
        role, text, spans = "assistant", "", None
        calls = _function_turn(k, raw, ctx)
    else:
        if raw in (None, []) and role == "assistant" and (msg.get("tool_calls") or part_calls or reasoning):
            raw = ""  # OpenAI: content null beside tool_calls; v1: a turn of reasoning and a call
        text, spans, images = content_of(k, raw, ctx)
    stype = explicit_type(msg.get("semantic_type"), ctx.types, f"message {k}")
    if msg.get("tool_calls") not in EMPTY:
        if role != "assistant" or calls:
            raise ValueError(f"malformed tool call: message {k} ({role}) has tool_calls; only assistant messages call")
        calls = tool_calls_of(k, msg["tool_calls"], ctx)
    if part_calls:
        if calls:
            raise ValueError(f"malformed tool call: message {k} has tool_call parts and tool_calls; give one")
        calls = [
            _function_turn(k, value, ctx)[0] if isinstance(value, str) else tool_calls_of(k, value, ctx)[0]
            for value in part_calls
        ]
    reasoning_span = None
    if reasoning is not None:
        text, spans, reasoning_span = with_reasoning(text, spans, reasoning)
    _loss_weight(k, role, msg.get("loss_weight"))
    unused_keys(msg, (role_key, content_key, *_MESSAGE_KEYS), ctx.ignore, f"message {k}")
    out: Message = {"role": role, "content": text, "semantic_type": stype}
    if spans:
        out["spans"] = spans
    if calls:
        out["tool_calls"] = calls
    if reasoning_span is not None:
        out["reasoning"] = reasoning_span  # where the content's reasoning block lies (data.train_reasoning)
    if images:
        out["images"] = images
    return out


def _object(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"malformed record: expected a JSON object with {what}, got {type(obj).__name__}")
    return obj


def convert_conversation(obj: Any, ctx: FormatContext) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """`messages` and `sharegpt`: a list of turns (they differ only in their default columns and tags)."""
    key = ctx.columns["messages"]
    obj = _object(obj, repr(key))
    if key not in obj:
        raise ValueError(f"malformed record: no {key!r} key (keys: {sorted(obj)[:6]}){_format_hint(obj, ctx.format)}")
    _record_keys(obj, ctx)
    turns = obj[key]
    if not isinstance(turns, list):
        raise ValueError(f"malformed record: {key!r} must be a list, got {type(turns).__name__}")
    if not turns:
        raise ValueError(f"empty conversation: {key!r} is an empty list")
    messages = [_turn(k, turn, ctx) for k, turn in enumerate(turns)]
    system = _system(obj, ctx)
    if system is not None:
        if messages[0]["role"] == "system":
            col = ctx.columns["system"]
            raise ValueError(f"system given twice: column {col!r} and a first system message; keep one")
        messages.insert(0, {"role": "system", "content": system, "semantic_type": None})
    attach_images(obj, messages, ctx)
    return messages, parse_tools(obj, ctx)


_ALPACA_WHAT = {"prompt": "instruction", "query": "input", "response": "answer"}


def _column(obj: Mapping[str, Any], ctx: FormatContext, key: str, required: bool = False) -> str | None:
    col = ctx.columns.get(key)
    value = obj.get(col) if col else None
    if value is None:
        if required:
            raise ValueError(
                f"missing column: no {col!r} key (keys: {sorted(obj)[:6]}); set columns.{key} to the column that "
                f"holds the {_ALPACA_WHAT[key]}" + _format_hint(obj, ctx.format)
            )
        return None
    if not isinstance(value, str):
        raise ValueError(f"non-string column: {col!r} ({key}) is a {type(value).__name__}, expected text")
    return value


def _history(obj: Mapping[str, Any], ctx: FormatContext) -> list[Message]:
    col = ctx.columns.get("history")
    pairs = obj.get(col) if col else None
    if pairs in (None, []):
        return []
    if not isinstance(pairs, list):
        raise ValueError(f"malformed history: column {col!r} is a {type(pairs).__name__}; give [[instruction, answer]]")
    out: list[Message] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(
                f"malformed history: column {col!r} item {i} is not an [instruction, answer] pair of texts"
            )
        out.append({"role": "user", "content": pair[0], "semantic_type": None})
        out.append({"role": "assistant", "content": pair[1], "semantic_type": None})
    return out


def _alpaca_prompt(obj: Mapping[str, Any], ctx: FormatContext) -> list[Message]:
    """[system] + history turns + user (instruction + "\\n" + input)."""
    prompt = _column(obj, ctx, "prompt", required=True)
    query = _column(obj, ctx, "query")
    system = _system(obj, ctx)
    messages: list[Message] = [{"role": "system", "content": system, "semantic_type": None}] if system else []
    messages += _history(obj, ctx)
    user = "\n".join(text for text in (prompt, query) if text)  # LLaMA-Factory joins exactly so
    messages.append({"role": "user", "content": user, "semantic_type": None})
    return messages


def convert_alpaca(obj: Any, ctx: FormatContext) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """`alpaca`: [system] + history turns + user (instruction + "\\n" + input) + assistant (output)."""
    obj = _object(obj, repr(ctx.columns["prompt"]))
    messages = _alpaca_prompt(obj, ctx)
    response = _column(obj, ctx, "response", required=True)
    _record_keys(obj, ctx)
    messages.append({"role": "assistant", "content": response, "semantic_type": None})
    attach_images(obj, messages, ctx)
    return messages, parse_tools(obj, ctx)


class Pair(NamedTuple):
    """A preference record: the prompt both sides share, then each side's continuation (one or more messages, at
    least one of them an assistant's: an agent's multi-turn continuation holds tool results or observations too)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    tools: list[dict[str, Any]] | None


def _side(obj: Mapping[str, Any], key: str, ctx: FormatContext, start: int) -> list[Message]:
    """One side of a pair: a message or a list of them (alpaca: a response text), numbered after the prompt."""
    col = ctx.columns[key]
    if col not in obj or obj[col] in EMPTY:
        raise ValueError(f"missing column: no {col!r} ({key} side of the pair; keys: {sorted(obj)[:6]})")
    raw = obj[col]
    if ctx.format == "alpaca":
        if not isinstance(raw, str):
            raise ValueError(f"non-string column: {col!r} ({key}) is a {type(raw).__name__}, expected the response")
        return [{"role": "assistant", "content": raw, "semantic_type": None}]
    turns = raw if isinstance(raw, list) else [raw]
    side = [_turn(start + k, turn, ctx) for k, turn in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in side):
        raise ValueError(f"nothing to prefer: the {key} side ({col!r}) has no assistant message")
    return side


def _common_start(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def convert_pair(obj: Any, ctx: FormatContext) -> Pair:
    """A preference record (`ranking: true`): the prompt from the format's own columns (messages / conversations,
    or alpaca's instruction, input, system and history) and the `chosen` and `rejected` sides. Without a messages
    column (LLaMA-Factory v1's chosen_messages / rejected_messages) each side is a whole conversation and the prompt
    is their longest common start. The sides must differ."""
    obj = _object(obj, "chosen and rejected")
    _record_keys(obj, ctx)
    if ctx.format == "alpaca":
        prompt, tools = _alpaca_prompt(obj, ctx), parse_tools(obj, ctx)
        attach_images(obj, prompt, ctx)
    elif ctx.columns.get("messages") is None:
        chosen, tools = convert_conversation(obj, _with_messages(ctx, "chosen"))
        rejected, _ = convert_conversation(obj, _with_messages(ctx, "rejected"))
        n = _common_start(chosen, rejected)
        pair = Pair(chosen[:n], chosen[n:], rejected[n:], tools)
        if chosen == rejected:
            raise ValueError("malformed pair: chosen and rejected are the same conversation; give two answers")
        if not pair.prompt:
            raise ValueError("malformed pair: chosen and rejected share no first message; give them a common prompt")
        if not pair.chosen or not pair.rejected:
            raise ValueError("malformed pair: one side is the start of the other; give each side its own answer")
        for key, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            if not any(m["role"] == "assistant" for m in side):
                raise ValueError(f"nothing to prefer: the {key} side after the common prompt has no assistant message")
        return pair
    else:
        prompt, tools = convert_conversation(obj, ctx)
    chosen = _side(obj, "chosen", ctx, len(prompt))
    rejected = _side(obj, "rejected", ctx, len(prompt))
    if chosen == rejected:
        raise ValueError("malformed pair: chosen and rejected are the same; a pair needs two different answers")
    return Pair(prompt, chosen, rejected, tools)


def _with_messages(ctx: FormatContext, side: str) -> FormatContext:
    """The context that reads one side's column as the whole conversation (and does not refuse the other side's)."""
    return replace(ctx, columns={**ctx.columns, "messages": ctx.columns[side]})


class Labelled(NamedTuple):
    """A labelled sample (KTO): a conversation whose last message, an assistant's, is the completion; `desirable`
    is the record's label."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    desirable: bool


def convert_labelled(obj: Any, ctx: FormatContext) -> Labelled:
    """A record of the format's own columns plus its label (the `kto_tag` column: true or false, as in
    LLaMA-Factory's kto_en_demo). The completion the label judges is the last message, which must be the
    assistant's; everything before it is the prompt."""
    col = ctx.columns["kto_tag"]
    obj = _object(obj, repr(col))
    if col not in obj:
        raise ValueError(f"missing column: no label {col!r} (columns.kto_tag; keys: {sorted(obj)[:6]})")
    label = obj[col]
    if not isinstance(label, bool):
        raise ValueError(f"malformed label: {col!r} is {label!r}; give true (desirable) or false (undesirable)")
    messages, tools = FORMAT_FUNCTIONS[ctx.format](obj, ctx)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError("nothing to label: a labelled record ends with the assistant's completion after a prompt")
    return Labelled(messages, tools, label)


FORMAT_FUNCTIONS: dict[str, Callable[..., tuple[list[Message], list[dict[str, Any]] | None]]] = {
    "messages": convert_conversation,
    "sharegpt": convert_conversation,
    "alpaca": convert_alpaca,
}
