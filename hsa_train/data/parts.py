"""One message's parts, as every format gives them: content (a string, or text parts that may carry their own
`semantic_type`, and media parts), tool calls and the record's tools; and the rule that a key carrying data is
never dropped silently (`unused_keys`: an error naming it, unless it is in `ignore_keys`). Problems are ValueErrors
with a short reason before the first colon (the skip report groups by it)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hsa_train.types import SemanticTypes

Message = dict[str, Any]

# Why a key the run does not use is refused (the data it carries would be dropped), by key.
_VISION = "images and videos go in the record's images / videos columns (columns.images), one per placeholder"
_AUDIO = "audio data is not supported yet"
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's: one per image of the record's images column, in order
_WEIGHTS = "per-record and per-message loss weights are not supported; roles and data.train_on decide what trains"
_PREFERENCE = "preference pairs: set ranking: true on the dataset entry"
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
    "chosen": _PREFERENCE,
    "rejected": _PREFERENCE,
}
_MEDIA_PART_TYPES = {"image": ("image", "image_url", "input_image"), "video": ("video", "video_url")}
_MEDIA_PART_TYPES["audio"] = ("audio", "input_audio", "audio_url")
MEDIA_PARTS = {ptype: kind for kind, ptypes in _MEDIA_PART_TYPES.items() for ptype in ptypes}
MEDIA_PHRASE = {
    "video": "videos are not supported yet (Qwen2-VL's video processor needs torchvision and a video decoder)",
    "audio": "audio is not supported",
}
_PART_KEYS = frozenset({"type", "text", "value", "semantic_type"})
_IMAGE_KEYS = ("image", "image_url", "path", "url")  # where an image part holds its picture
EMPTY = (None, "", [], {})
# How a reasoning part is rendered: a block before the message's text, as Qwen3's and DeepSeek-R1's templates write
# it (Qwen3's template reads such a block from the content into its own reasoning field).
REASONING_OPEN, REASONING_CLOSE = "<think>\n", "\n</think>\n\n"


def ignore_set(ignore_keys: Iterable[str]) -> frozenset[str]:
    if isinstance(ignore_keys, frozenset):
        return ignore_keys
    if isinstance(ignore_keys, str) or not all(isinstance(k, str) for k in ignore_keys):
        raise ValueError(f"data.ignore_keys={ignore_keys!r}: give a list of key names, e.g. [id, source]")
    return frozenset(ignore_keys)


def unused_keys(obj: Mapping[str, Any], used: Iterable[str], ignore: frozenset[str], where: str) -> None:
    """Refuses keys that carry data the run would drop. None (or an empty string, list or object) carries none."""
    used = set(used)
    unused = [k for k, v in obj.items() if k not in used and k not in ignore and v not in EMPTY]
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


def explicit_type(value: Any, types: SemanticTypes, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in types.names):
        raise ValueError(
            f"unknown semantic_type: {where} has semantic_type {value!r} (known: {', '.join(types.names)})"
        )
    return value


def attach_images(obj: Mapping[str, Any], messages: list[Message], ctx: FormatContext) -> None:
    """The record's `images` column, one per `<image>` placeholder in order over the messages: each message gets
    the images of its own placeholders (`images`: a list of references), so truncation that drops a turn drops
    its images with it. Placeholders and images must match in number; a record without images keeps `<image>`
    as text only when it has no image column at all."""
    col = ctx.columns.get("images")
    images = obj.get(col) if col else None
    if images in EMPTY:
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
    keys = [key for key in _IMAGE_KEYS if part.get(key) not in EMPTY]
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


def parse_json(text: str, problem: str, hint: str = "") -> Any:
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
        raw = parse_json(
            raw, f"tools not JSON: column {col!r} is not JSON", "; give a JSON list of function descriptions"
        )
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        got = type(raw).__name__ if not isinstance(raw, list) else "a list with non-objects"
        raise ValueError(
            f"malformed tools: column {col!r} must be a list of objects (function descriptions), got {got}"
        )
    return raw or None


def assistant_parts(k: int, raw: Any, ctx: FormatContext) -> tuple[Any, tuple[str, str | None] | None, list[Any]]:
    """An assistant message's content parts of type `reasoning` and `tool_call` taken out (LLaMA-Factory v1's
    layout): (the other parts, the reasoning text joined with its semantic_type (None: the message's) or None,
    the tool calls' values). A string content has none."""
    if not isinstance(raw, list):
        return raw, None, []
    rest, thoughts, calls, types = [], [], [], set()
    for p, part in enumerate(raw):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype not in ("reasoning", "tool_call"):
            rest.append(part)
            continue
        where = f"message {k} part {p}"
        keys = [key for key in ("text", "value") if part.get(key) is not None]
        if len(keys) != 1:
            raise ValueError(f"part without text: {where} ({ptype}) needs exactly one of 'text' or 'value'")
        value = part[keys[0]]
        unused_keys(part, _PART_KEYS, ctx.ignore, where)
        if ptype == "tool_call":
            calls.append(value)
            continue
        if not isinstance(value, str):
            raise ValueError(f"part without text: {where} (reasoning) has a {type(value).__name__}, expected text")
        thoughts.append(value)
        types.add(explicit_type(part.get("semantic_type"), ctx.types, where))
    if len(types) > 1:
        raise ValueError(f"reasoning types: message {k}'s reasoning parts have different semantic_types; give one")
    reasoning = ("".join(thoughts), types.pop()) if thoughts else None
    return rest, reasoning, calls


def with_reasoning(
    text: str, spans: list[tuple[int, int, str]] | None, reasoning: tuple[str, str | None]
) -> tuple[str, list[tuple[int, int, str]] | None, tuple[int, int]]:
    """The content with its reasoning block in front (REASONING_OPEN / CLOSE), the text's spans moved after it and
    the block typed when the reasoning has its own type; and the block's character range in the content."""
    thought, stype = reasoning
    block = f"{REASONING_OPEN}{thought.strip(chr(10))}{REASONING_CLOSE}"
    n = len(block)
    moved = [(a + n, b + n, t) for a, b, t in spans or []]
    if stype is not None:
        moved.insert(0, (0, n, stype))
    return block + text.lstrip("\n"), moved or None, (0, n)


def content_of(k: int, raw: Any, ctx: FormatContext) -> tuple[str, list[tuple[int, int, str]] | None, list[Any]]:
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
            stype = explicit_type(part.get("semantic_type"), ctx.types, where)
            if stype is not None:
                spans.append((pos, pos + len(IMAGE_PLACEHOLDER), stype))
            texts.append(IMAGE_PLACEHOLDER)
            pos += len(IMAGE_PLACEHOLDER)
            continue
        if ptype in MEDIA_PARTS:
            kind = MEDIA_PARTS[ptype]
            raise ValueError(f"{kind} part: {MEDIA_PHRASE[kind]} ({where} has type {ptype!r})")
        if ptype != "text":
            raise ValueError(f"unknown content part: {where} has type {ptype!r} (known: text)")
        keys = [key for key in ("text", "value") if part.get(key) is not None]
        if len(keys) > 1:
            raise ValueError(f"malformed content part: {where} has both 'text' and 'value'; give one")
        text = part[keys[0]] if keys else None
        if not isinstance(text, str):
            got = "none" if text is None else f"a {type(text).__name__}"
            raise ValueError(f"part without text: {where} has {got} for its text; give {{'type': 'text', 'text': ...}}")
        stype = explicit_type(part.get("semantic_type"), ctx.types, where)
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
        args = parse_json(args, f"tool call not JSON: {where} ({name}) has arguments that are not JSON")
    if not isinstance(args, dict):
        raise ValueError(
            f"malformed tool call: {where} ({name}) has arguments of type {type(args).__name__}; give an object"
        )
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def tool_calls_of(k: int, calls: Any, ctx: FormatContext) -> list[dict[str, Any]]:
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"malformed tool call: message {k} has tool calls of type {type(calls).__name__}; give a list")
    return [_tool_call(f"message {k} call {i}", call, ctx) for i, call in enumerate(calls)]
