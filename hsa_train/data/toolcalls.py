"""What the chat template sees of a record (SemanticTokenizer.prepare): messages, tools, tool calls.

Messages
    Each message goes to the template as {"role", "content"}, plus "tool_calls" when it has some; other keys
    (semantic_type, spans, type_rule, ...) never reach it. A record's tools go to it as `tools=`; a bare function
    schema ({"name", "description", "parameters"}, as LLaMA-Factory stores them) is wrapped the OpenAI way first:
    {"type": "function", "function": schema}.

Templates that do not render tools (probed once per template: `PROBE_TOOLS`, `PROBE_CALL` carry sentinel names; a
sentinel that does not come out means the template ignores that part), written as text the way Qwen2.5's
(Hermes-style) template writes them:
- tool calls: after the assistant's content ("\\n" between them when the content is not empty), one block per call,
  joined by "\\n": '<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>' (json.dumps, ensure_ascii=False;
  arguments given as a JSON string are parsed first). They are then content: trained in assistant turns, tokenized
  as plain text.
- tools: `tools_system_text` (TOOLS_HEADER, one JSON per line, "\\n</tools>"), appended to a first system message
  after "\\n\\n" (or as its content when it is empty), else inserted as a new first system message. The inserted
  message belongs to no record message: its tokens get message_index -1 and the default type (semantic_type None).

Tool calls and tools that the template writes itself are the template's text, not content: special-token text in
them would become special tokens, so it is refused (`refuse_special_text`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

TOOL_SENTINEL = "HSAxTOOLxSENTINELxQZ"
CALL_SENTINEL = "HSAxCALLxSENTINELxQZ"
TOOLS_FALLBACK_NOTE = (
    "the chat template does not render tools; tool calls are written as <tool_call> JSON in the assistant's content "
    "(Hermes style)"
)
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_PROBE_SCHEMA = {"name": TOOL_SENTINEL, "description": "A probe.", "parameters": {"type": "object", "properties": {}}}
PROBE_TOOLS = [{"type": "function", "function": _PROBE_SCHEMA}]
PROBE_CALL = [{"type": "function", "function": {"name": CALL_SENTINEL, "arguments": {}}}]


class TemplateInput(NamedTuple):
    """A record as the template sees it."""

    messages: list[dict[str, Any]]  # role, content (tool-call text added where the template has no tool calls)
    tools: list[Any] | None  # for `tools=`; None when none, or when written into a system message
    source: list[int]  # per message: index of the record's message, -1 for the inserted tools system message


def template_input(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None,
    support: tuple[bool, bool],
    specials: re.Pattern | None,
) -> TemplateInput:
    """The record as the template sees it, given what the template renders: (tools, tool calls)."""
    tools = [wrap_tool(tool) for tool in tools] if tools else None
    native_tools, native_calls = support
    plain: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content = m["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, not {type(content).__name__}")
        message = {"role": m["role"], "content": content}
        calls = m.get("tool_calls")
        if calls and native_calls:
            refuse_special_text(specials, calls, f"message {i}: a tool call")
            message["tool_calls"] = calls
        elif calls:
            message["content"] = content + ("\n" if content else "") + hermes_tool_calls(calls, f"message {i}")
        plain.append(message)
    source = list(range(len(plain)))
    if tools and native_tools:
        refuse_special_text(specials, tools, "a tool's schema")
    elif tools:
        text = tools_system_text(tools)
        if plain and plain[0]["role"] == "system":
            first = plain[0]["content"]
            plain[0] = {**plain[0], "content": f"{first}\n\n{text}" if first else text}
        else:
            plain.insert(0, {"role": "system", "content": text})
            source.insert(0, -1)
        tools = None
    return TemplateInput(plain, tools, source)


def wrap_tool(tool: Any) -> Any:
    """A bare function schema as an OpenAI tool ({"type": "function", "function": schema}); others as they are."""
    if isinstance(tool, Mapping) and "function" not in tool and "name" in tool:
        return {"type": "function", "function": dict(tool)}
    return tool


def hermes_tool_calls(calls: Sequence[Any], where: str = "a message") -> str:
    """Tool calls as Qwen2.5 / Hermes templates write them: one <tool_call> block per call, joined by "\\n"."""
    blocks = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or "name" not in function:
            raise ValueError(f"{where}: a tool call needs a function name, not {call!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI's API sends them as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(blocks)


_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """A generated reply split into its content and its Hermes <tool_call> blocks (the inverse of
    `hermes_tool_calls`), as OpenAI-style calls: {"type": "function", "function": {"name", "arguments"}} with the
    arguments as a JSON string. A block that is not a JSON object with a name stays in the content."""
    calls, kept, last = [], [], 0
    for match in _CALL_BLOCK.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        arguments = body.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append({"type": "function", "function": {"name": body["name"], "arguments": arguments}})
        kept.append(text[last : match.start()])
        last = match.end()
    kept.append(text[last:])
    return "\n".join(piece.strip() for piece in kept if piece.strip()), calls


def tools_system_text(tools: Sequence[Any]) -> str:
    """The tool list as system-prompt text (Qwen2.5's wording), one JSON schema per line."""
    return TOOLS_HEADER + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools) + "\n</tools>"


def refuse_special_text(specials: re.Pattern | None, value: Any, what: str) -> None:
    """A ValueError when a string in `value` (nested dicts and lists, keys too) holds special-token text."""
    if specials is None:
        return
    for text in _strings(value):
        found = specials.search(text)
        if found:
            raise ValueError(
                f"{what} holds the special-token text {found.group()!r}, which the chat template would write as a "
                "special token; remove it"
            )


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
