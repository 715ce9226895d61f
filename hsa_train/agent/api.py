"""The OpenAI chat-completions API, as the server speaks it: a request checked field by field (a bad one is a
`RequestError` naming its field, answered 400 in OpenAI's error shape), and the response, whole or in chunks.

Beyond OpenAI's fields a message may carry `semantic_type` (and content parts theirs), and a request `typing`: the
training dataset whose saved rules type its untyped messages. Every reply message says its `semantic_type`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsa_train.agent.decoding import DecodeOptions
from hsa_train.agent.session import Reply

MAX_CHOICES = 8
# Accepted with their neutral value only: hsa_train has no such sampling knob, and quietly ignoring a set one would
# answer another question than the one asked.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "parallel_tool_calls": True}
IGNORED = ("user", "metadata", "store", "service_tier")  # bookkeeping a client may send; nothing to decode by
KNOWN = (
    "model", "messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "n", "stream", "stream_options", "typing", *NEUTRAL, *IGNORED,
)  # fmt: skip


class RequestError(ValueError):
    """A request the server refuses: the field at fault, and what to send instead."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    options: list[DecodeOptions]  # one per choice
    tools: list[Any] | None
    typing: str | None
    stream: bool
    include_usage: bool


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{name}={value!r}: give a number in [{low}, {high}]", name, "invalid_value")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name}={value!r}: give an integer in [{low}, {high}]", name, "invalid_value")
    return value


def parse_chat_request(body: Any, model_id: str, max_tokens: int) -> ChatRequest:
    """The request's fields checked; `max_tokens` bounds a reply (the server's limit)."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(body) - set(KNOWN))
    if unknown:
        raise RequestError(f"unrecognized request argument: {unknown[0]}", unknown[0], "unknown_parameter")
    if body.get("model") not in (None, model_id):
        raise RequestError(
            f"the model {body['model']!r} does not exist; this server serves {model_id!r}",
            "model",
            "model_not_found",
            404,
        )
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise RequestError(f"{name} is not supported by hsa_train (leave it at {neutral})", name, "unsupported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise RequestError("messages: give a non-empty list of message objects", "messages", "invalid_value")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools: give a list of tool objects", "tools", "invalid_value")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise RequestError("tool_choice: only 'auto' or 'none' are supported", "tool_choice", "unsupported")
    if body.get("tool_choice") == "none":
        tools = None
    limit = _integer(body, "max_completion_tokens", None, 1, max_tokens)
    limit = _integer(body, "max_tokens", limit, 1, max_tokens) or min(256, max_tokens)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError("stop: give a string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p=0: give a number in (0, 1]", "top_p", "invalid_value")
    options = [
        DecodeOptions(limit, temperature, top_p, None if seed is None else seed + k, list(stop or [])) for k in range(n)
    ]
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping) or set(stream_options) - {"include_usage"}:
        raise RequestError("stream_options: only {include_usage: bool} is supported", "stream_options", "invalid_value")
    typing = body.get("typing")
    if typing is not None and not isinstance(typing, str):
        raise RequestError("typing: name a training dataset (a string)", "typing", "invalid_value")
    return ChatRequest(
        [dict(m) for m in messages],
        options,
        tools,
        typing,
        bool(body.get("stream", False)),
        bool(stream_options.get("include_usage", False)),
    )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def reply_message(reply: Reply) -> dict[str, Any]:
    """The reply as an OpenAI assistant message (tool calls with ids), with its semantic type."""
    calls = reply.message.get("tool_calls")
    content = reply.message.get("content") or ""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", **call} for call in calls]
    message["semantic_type"] = reply.message["semantic_type"]
    return message


def finish_reason(reply: Reply) -> str:
    return "tool_calls" if reply.message.get("tool_calls") else reply.finish_reason


def usage(replies: list[Reply]) -> dict[str, Any]:
    prompt = replies[0].prompt_tokens
    completion = sum(r.completion_tokens for r in replies)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": replies[0].cached_tokens},
    }


def completion(cid: str, model_id: str, replies: list[Reply], typed: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {"index": k, "message": reply_message(r), "finish_reason": finish_reason(r), "logprobs": None}
            for k, r in enumerate(replies)
        ],
        "usage": usage(replies),
        "semantic_types": [{"semantic_type": m["semantic_type"], "type_rule": m["type_rule"]} for m in typed],
    }


def chunk(cid: str, model_id: str, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
