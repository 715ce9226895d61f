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

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from hsa_train.data.spec import MEDIA_COLUMNS, DatasetSpec, resolve_datasets  # noqa: F401  (re-exported)
from hsa_train.types import SemanticTypes

Message = dict[str, Any]
Converter = Callable[[Any], tuple[list[Message], list[dict[str, Any]] | None]]

# Why a key the run does not use is refused (the data it carries would be dropped), by key.
_VISION = "images and videos go in the record's images / videos columns (columns.images), one per placeholder"
_AUDIO = "audio data is not supported yet"
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's: one per image of the record's images column, in order
_WEIGHTS = "per-record and per-message loss weights are not supported; roles and data.train_on decide what trains"
_PREFERENCE = "preference data is not supported (hsa_train trains on conversations: supervised fine-tuning)"
UNUSED_HINTS = {
    "images": _VISION,
    "image": _VISION,
    "videos": _VISION,
    "video": _VISION,
    "audios": _AUDIO,
    "audio": _AUDIO,
    "tools": "tool definitions are read from the dataset's tools column only (columns.tools)",
    "system": "a record-level system prompt is read only from the dataset's system column (columns.system); "
    "or make it a first message with role 'system'",
    "loss_weight": _WEIGHTS,
    "weight": _WEIGHTS,
    "loss": _WEIGHTS,
    "function_call": "old-style function_call is not read; give tool_calls",
    "tool_call_id": "tool call ids are not rendered",
    "name": "message names are not rendered",
    "reasoning_content": "reasoning is not rendered separately; put it in the content",
    "chosen": _PREFERENCE,
    "rejected": _PREFERENCE,
}
_MEDIA_PART_TYPES = {"image": ("image", "image_url", "input_image"), "video": ("video", "video_url")}
_MEDIA_PART_TYPES["audio"] = ("audio", "input_audio", "audio_url")
MEDIA_PARTS = {ptype: kind for kind, ptypes in _MEDIA_PART_TYPES.items() for ptype in ptypes}
_MEDIA_PHRASE = {
    "video": "videos are not supported yet (Qwen2-VL's video processor needs torchvision and a video decoder)",
    "audio": "audio is not supported",
}
_MESSAGE_KEYS = ("semantic_type", "tool_calls", "loss_weight")
_PART_KEYS = frozenset({"type", "text", "value", "semantic_type"})
_IMAGE_KEYS = ("image", "image_url", "path", "url")  # where an image part holds its picture
_EMPTY = (None, "", [], {})


def ignore_set(ignore_keys: Iterable[str]) -> frozenset[str]:
    if isinstance(ignore_keys, frozenset):
        return ignore_keys
    if isinstance(ignore_keys, str) or not all(isinstance(k, str) for k in ignore_keys):
        raise ValueError(f"data.ignore_keys={ignore_keys!r}: give a list of key names, e.g. [id, source]")
    return frozenset(ignore_keys)


def unused_keys(obj: Mapping[str, Any], used: Iterable[str], ignore: frozenset[str], where: str) -> None:
    """Refuses keys that carry data the run would drop. None (or an empty string, list or object) carries none."""
    used = set(used)
    unused = [k for k, v in obj.items() if k not in used and k not in ignore and v not in _EMPTY]
    if not unused:
        return
    hints = "; ".join(dict.fromkeys(UNUSED_HINTS[k] for k in unused if k in UNUSED_HINTS))
    raise ValueError(
        f"unused key: {where} has {', '.join(map(repr, unused))}, not used by training"
        + (f" ({hints})" if hints else "")
        + "; remove it, or list it in data.ignore_keys if it is only metadata"
    )


@dataclass(frozen=True)
class FormatContext:
    """What a format function needs besides the record (picklable, for worker processes)."""

    format: str
    columns: Mapping[str, str | None]
    tags: Mapping[str, str | None]
    types: SemanticTypes
    ignore: frozenset[str]
    role_of: dict[str, str] = field(init=False)  # role tag -> role ("function" for the function-call tag)

    def __post_init__(self) -> None:
        names = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
        names |= {"observation_tag": "tool", "function_tag": "function"}
        role_of = {self.tags[k]: role for k, role in names.items() if self.tags.get(k)}
        object.__setattr__(self, "role_of", role_of)


def make_converter(spec: DatasetSpec, types: SemanticTypes, ignore_keys: Iterable[str] = ("id",)) -> Converter:
    """The format function of `spec`, bound to its columns, tags and the run's types: record -> (messages, tools)."""
    ctx = FormatContext(spec.format, dict(spec.columns), dict(spec.tags), types, ignore_set(ignore_keys))
    return partial(FORMAT_FUNCTIONS[spec.format], ctx=ctx)


def _format_hint(obj: Mapping[str, Any], fmt: str) -> str:
    if "conversations" in obj and fmt != "sharegpt":
        return "; it looks like ShareGPT ('conversations'): set format: sharegpt for this dataset"
    if "instruction" in obj and fmt != "alpaca":
        return "; it looks like alpaca ('instruction'): set format: alpaca for this dataset"
    if "messages" in obj and fmt != "messages":
        return "; it looks like OpenAI messages ('messages'): set format: messages for this dataset"
    return ""


def _explicit_type(value: Any, types: SemanticTypes, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in types.names):
        raise ValueError(
            f"unknown semantic_type: {where} has semantic_type {value!r} (known: {', '.join(types.names)})"
        )
    return value


def _record_keys(obj: Mapping[str, Any], ctx: FormatContext) -> None:
    """Audio and video columns with data are errors; other keys the format does not read are refused unless
    ignored."""
    for key in ("videos", "audios"):
        col = ctx.columns.get(key)
        if col and obj.get(col) not in _EMPTY:
            what = "audio" if key == "audios" else "video"
            raise ValueError(f"{what} not supported: the record has {key} in column {col!r}; {_MEDIA_PHRASE[what]}")
    used = {col for col in ctx.columns.values() if col}
    unused_keys(obj, used, ctx.ignore, "the record")


def _attach_images(obj: Mapping[str, Any], messages: list[Message], ctx: FormatContext) -> None:
    """The record's `images` column, one per `<image>` placeholder in order over the messages: each message gets
    the images of its own placeholders (`images`: a list of references), so truncation that drops a turn drops
    its images with it. Placeholders and images must match in number; a record without images keeps `<image>`
    as text only when it has no image column at all."""
    col = ctx.columns.get("images")
    images = obj.get(col) if col else None
    if images in _EMPTY:
        return
    if any(m.get("images") for m in messages):
        raise ValueError(f"images given twice: column {col!r} and image content parts; use one of them")
    if not isinstance(images, list):
        images = [images]
    counts = [m["content"].count(IMAGE_PLACEHOLDER) for m in messages]
    if sum(counts) != len(images):
        raise ValueError(
            f"placeholder count: the messages hold {sum(counts)} {IMAGE_PLACEHOLDER} placeholders and column "
            f"{col!r} has {len(images)} images; put one {IMAGE_PLACEHOLDER} in the text for each image"
        )
    start = 0
    for msg, n in zip(messages, counts):
        if n:
            msg["images"] = images[start : start + n]
            start += n


def _image_part(where: str, part: Mapping[str, Any], ctx: FormatContext) -> Any:
    """The picture of an image part: `{"type": "image", "image": path}` (or image_url: {"url": ...})."""
    keys = [key for key in _IMAGE_KEYS if part.get(key) not in _EMPTY]
    if len(keys) != 1:
        raise ValueError(
            f"malformed image part: {where} needs exactly one of {', '.join(_IMAGE_KEYS)}, it has "
            f"{', '.join(keys) or 'none'}"
        )
    ref = part[keys[0]]
    if isinstance(ref, Mapping) and "url" in ref:
        ref = ref["url"]
    unused_keys(part, ("type", *_IMAGE_KEYS, "semantic_type"), ctx.ignore, where)
    return ref


def _system(obj: Mapping[str, Any], ctx: FormatContext) -> str | None:
    col = ctx.columns.get("system")
    value = obj.get(col) if col else None
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"non-string column: {col!r} (system) is a {type(value).__name__}, expected text")
    return value


def _json(text: str, problem: str, hint: str = "") -> Any:
    """`text` parsed, or ValueError: `problem (what the parser said at column N)hint`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{problem} ({exc.msg} at column {exc.colno}){hint}") from None


def parse_tools(obj: Mapping[str, Any], ctx: FormatContext) -> list[dict[str, Any]] | None:
    """The record's tool definitions (a JSON string or a list of objects), or None when it has none."""
    col = ctx.columns.get("tools")
    raw = obj.get(col) if col else None
    if raw in (None, ""):
        return None
    if isinstance(raw, str):
        raw = _json(raw, f"tools not JSON: column {col!r} is not JSON", "; give a JSON list of function descriptions")
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        got = type(raw).__name__ if not isinstance(raw, list) else "a list with non-objects"
        raise ValueError(
            f"malformed tools: column {col!r} must be a list of objects (function descriptions), got {got}"
        )
    return raw or None


def _content(k: int, raw: Any, ctx: FormatContext) -> tuple[str, list[tuple[int, int, str]] | None, list[Any]]:
    """A message's text, its typed spans and its images: a string, or parts joined with "" (an image part becomes
    an `<image>` placeholder in the text, its picture the message's next image)."""
    if isinstance(raw, str):
        return raw, None, []
    if not isinstance(raw, list):
        raise ValueError(f"non-string content: message {k} has content of type {type(raw).__name__}")
    texts: list[str] = []
    spans: list[tuple[int, int, str]] = []
    images: list[Any] = []
    pos = 0
    for p, part in enumerate(raw):
        where = f"message {k} part {p}"
        if not isinstance(part, dict):
            raise ValueError(
                f"non-string content: {where} is a {type(part).__name__}; content is a string or a list of parts "
                '{"type": "text", "text": ...}'
            )
        ptype = part.get("type") or "text"
        if MEDIA_PARTS.get(ptype) == "image":
            images.append(_image_part(where, part, ctx))
            stype = _explicit_type(part.get("semantic_type"), ctx.types, where)
            if stype is not None:
                spans.append((pos, pos + len(IMAGE_PLACEHOLDER), stype))
            texts.append(IMAGE_PLACEHOLDER)
            pos += len(IMAGE_PLACEHOLDER)
            continue
        if ptype in MEDIA_PARTS:
            kind = MEDIA_PARTS[ptype]
            raise ValueError(f"{kind} part: {_MEDIA_PHRASE[kind]} ({where} has type {ptype!r})")
        if ptype != "text":
            raise ValueError(f"unknown content part: {where} has type {ptype!r} (known: text)")
        keys = [key for key in ("text", "value") if part.get(key) is not None]
        if len(keys) > 1:
            raise ValueError(f"malformed content part: {where} has both 'text' and 'value'; give one")
        text = part[keys[0]] if keys else None
        if not isinstance(text, str):
            got = "none" if text is None else f"a {type(text).__name__}"
            raise ValueError(f"part without text: {where} has {got} for its text; give {{'type': 'text', 'text': ...}}")
        stype = _explicit_type(part.get("semantic_type"), ctx.types, where)
        unused_keys(part, _PART_KEYS, ctx.ignore, where)
        if stype is not None and text:
            spans.append((pos, pos + len(text), stype))
        if IMAGE_PLACEHOLDER in text:
            raise ValueError(
                f"placeholder in a text part: {where} holds {IMAGE_PLACEHOLDER}; with content parts, give each "
                'image as its own part {"type": "image", "image": path}'
            )
        texts.append(text)
        pos += len(text)
    return "".join(texts), spans or None, images


def _tool_call(where: str, call: Any, ctx: FormatContext) -> dict[str, Any]:
    """One call, OpenAI's {"id", "type", "function": {"name", "arguments"}} or flat {"name", "arguments"}."""
    if not isinstance(call, dict):
        raise ValueError(f"malformed tool call: {where} is a {type(call).__name__}, expected an object")
    fn = call.get("function")
    if fn is not None:
        if call.get("type") not in (None, "function"):
            raise ValueError(
                f"malformed tool call: {where} has type {call['type']!r}; only function calls are supported"
            )
        if not isinstance(fn, dict):
            raise ValueError(f"malformed tool call: {where} has a function of type {type(fn).__name__}")
        unused_keys(call, ("id", "type", "function"), ctx.ignore, where)
    else:
        fn = call
    unused_keys(fn, ("name", "arguments", "id", "type"), ctx.ignore, where)
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"malformed tool call: {where} has no function name")
    args = fn.get("arguments")
    if args in (None, ""):
        args = {}
    if isinstance(args, str):
        args = _json(args, f"tool call not JSON: {where} ({name}) has arguments that are not JSON")
    if not isinstance(args, dict):
        raise ValueError(
            f"malformed tool call: {where} ({name}) has arguments of type {type(args).__name__}; give an object"
        )
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def _tool_calls(k: int, calls: Any, ctx: FormatContext) -> list[dict[str, Any]]:
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"malformed tool call: message {k} has tool calls of type {type(calls).__name__}; give a list")
    return [_tool_call(f"message {k} call {i}", call, ctx) for i, call in enumerate(calls)]


def _function_turn(k: int, raw: Any, ctx: FormatContext) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn: its value is JSON {"name", "arguments"} (or a list of them)."""
    if isinstance(raw, str):
        raw = _json(
            raw,
            f"tool call not JSON: message {k} ({ctx.tags['function_tag']}) has a value that is not JSON",
            '; give {"name": ..., "arguments": {...}}',
        )
    return _tool_calls(k, raw, ctx)


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
    if role == "function":
        role, text, spans = "assistant", "", None
        calls = _function_turn(k, raw, ctx)
    else:
        if raw is None and role == "assistant" and msg.get("tool_calls"):
            raw = ""  # OpenAI: content null beside tool_calls
        text, spans, images = _content(k, raw, ctx)
    stype = _explicit_type(msg.get("semantic_type"), ctx.types, f"message {k}")
    if msg.get("tool_calls") not in _EMPTY:
        if role != "assistant" or calls:
            raise ValueError(f"malformed tool call: message {k} ({role}) has tool_calls; only assistant messages call")
        calls = _tool_calls(k, msg["tool_calls"], ctx)
    _loss_weight(k, role, msg.get("loss_weight"))
    unused_keys(msg, (role_key, content_key, *_MESSAGE_KEYS), ctx.ignore, f"message {k}")
    out: Message = {"role": role, "content": text, "semantic_type": stype}
    if spans:
        out["spans"] = spans
    if calls:
        out["tool_calls"] = calls
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
    _attach_images(obj, messages, ctx)
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


def convert_alpaca(obj: Any, ctx: FormatContext) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """`alpaca`: [system] + history turns + user (instruction + "\\n" + input) + assistant (output)."""
    obj = _object(obj, repr(ctx.columns["prompt"]))
    prompt = _column(obj, ctx, "prompt", required=True)
    query = _column(obj, ctx, "query")
    response = _column(obj, ctx, "response", required=True)
    _record_keys(obj, ctx)
    system = _system(obj, ctx)
    messages: list[Message] = [{"role": "system", "content": system, "semantic_type": None}] if system else []
    messages += _history(obj, ctx)
    user = "\n".join(text for text in (prompt, query) if text)  # LLaMA-Factory joins exactly so
    messages.append({"role": "user", "content": user, "semantic_type": None})
    messages.append({"role": "assistant", "content": response, "semantic_type": None})
    _attach_images(obj, messages, ctx)
    return messages, parse_tools(obj, ctx)


FORMAT_FUNCTIONS: dict[str, Callable[..., tuple[list[Message], list[dict[str, Any]] | None]]] = {
    "messages": convert_conversation,
    "sharegpt": convert_conversation,
    "alpaca": convert_alpaca,
}
