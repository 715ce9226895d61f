"""Chat-template rendering for SemanticTokenizer (SPEC §2): what the template sees, tools, and where each message's
segment, generation prompt and content lie in the one full render, in time linear in the number of messages.

What the template sees of a record, tools and tool calls included: toolcalls.py.

Linear cost
    A segment is what rendering one more message adds (SPEC §2). Rendering every prefix costs O(n²) message renders;
    instead message j is rendered after a short context: message 0 and the messages from `s` on, where s lies
    `window_context` or more messages before j's chunk of `window_chunk` messages and is odd, so j keeps the parity
    of its index (templates check alternation with loop.index0 % 2) and message 0 stays first (templates look at
    messages[0] for a system prompt). The segment is render(ctx + [m_j]) after render(ctx), the same for the content
    probe; the generation prompt is rendered once per conversation and kind of message before it (role, tool calls
    or not), as templates write one header whatever came earlier. Checks, so that no result ever changes:
    - each windowed render starts with the render of its context (else the message is refused or re-done below);
    - the windowed segments, concatenated, equal the full render, for every conversation;
    - per template, the first `window_checks` conversations that use a window are also done the exhaustive way
      (every prefix, every generation prompt rendered) and must give the same Segments.
    On any failure the conversation is done the exhaustive way; if that works, windows stay off for this template
    for good (`TemplateChecks.window_ok`); if it fails too, its error (e.g. "not prefix-stable") is the answer.
    The compiled template is run directly (`_fast_render`, flag `_fast_ok`): its full render is compared with
    apply_chat_template's on each template's first conversations, with and without tools (apply_chat_template only
    copies plain data, which ours are, before it runs the same compiled template), and switched off for good on a
    difference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hsa_train.data.toolcalls import (
    CALL_SENTINEL,
    PROBE_CALL,
    PROBE_TOOLS,
    TOOL_SENTINEL,
    TOOLS_FALLBACK_NOTE,
    TemplateInput,
    template_input,
)
from hsa_train.model.compat import compile_chat_template

# Stands in for a message's content to find where a template puts it: letters only, so trims and escapes keep it.
CONTENT_SENTINEL = "HSAxCONTENTxSENTINELxQZ"


class Segments(NamedTuple):
    """A conversation's full render and where its parts lie, in characters (per message of the rendered list)."""

    text: str
    starts: list[int]  # where each message's segment starts
    trained: list[tuple[int, int] | None]  # per message: an assistant turn's text after its generation prompt
    plain: list[tuple[int, int]]  # contents that spell special tokens, to tokenize as plain text
    content: list[tuple[int, int, int] | None]  # located contents: (start, end, where that text starts in content)


@dataclass
class TemplateChecks:
    """What is known about one template source (see the module docstring)."""

    window_ok: bool = True
    checks_left: int = 3  # windowed conversations still to check against the exhaustive method
    fast_checks: list[int] = field(default_factory=lambda: [3, 3])  # per (without, with tools): see `_fast_render`
    tool_support: tuple[bool, bool] | None = None  # (renders tools, renders tool calls), probed on first need


class TemplateRendering:
    """Rendering half of SemanticTokenizer (a mixin: needs `self.tokenizer`)."""

    window_context = 4  # at least this many messages before each message (and message 0) in its render
    window_chunk = 8  # messages that share one window start
    window_checks = 3  # conversations per template checked against the exhaustive method

    def _init_rendering(self) -> None:
        self._compiled: tuple[str, Any] | None = None  # (template source, compiled template) for the fast path
        self._fast_ok = True
        self._specials: tuple[int, frozenset[int], re.Pattern | None] | None = None  # (vocab size, ids, regex)
        self._checks: dict[str, TemplateChecks] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for worker processes: the compiled template (jinja closures) is compiled again there."""
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    # -- what the template is and sees -----------------------------------------------------------------------------
    def _source(self, tools: Any = None) -> str:
        """The template source apply_chat_template uses (a tokenizer may have a "tool_use" one)."""
        get = getattr(self.tokenizer, "get_chat_template", None)
        return get(None, tools) if get is not None else self.tokenizer.chat_template

    def _template_checks(self, source: str) -> TemplateChecks:
        checks = self._checks.get(source)
        if checks is None:
            checks = self._checks[source] = TemplateChecks(checks_left=self.window_checks)
        return checks

    def _tool_support(self, tools: Any = PROBE_TOOLS) -> tuple[bool, bool]:
        """(renders tools, renders tool calls) for the template a record with `tools` gets, probed once with
        sentinel names."""
        source = self._source(tools)
        checks = self._template_checks(source)
        if checks.tool_support is None:
            ask, answer = {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}
            call = {"role": "assistant", "content": "", "tool_calls": PROBE_CALL}

            def probe(messages: list[dict[str, Any]], tools: Any) -> str:
                try:
                    return self._apply(messages, tools=tools, chat_template=source)
                except ValueError:  # the template refuses it: it does not render it
                    return ""

            text = probe([ask, call], PROBE_TOOLS)
            if text:
                checks.tool_support = (TOOL_SENTINEL in text, CALL_SENTINEL in text)
            else:  # refused together: each alone
                checks.tool_support = (
                    TOOL_SENTINEL in probe([ask, answer], PROBE_TOOLS),
                    CALL_SENTINEL in probe([ask, call], None),
                )
        return checks.tool_support

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders both a tool list and tool calls (else see TOOLS_FALLBACK_NOTE)."""
        return all(self._tool_support())

    @property
    def tools_note(self) -> str | None:
        """A line to print once when records have tools and the template does not render them, else None."""
        return None if self.renders_tools else TOOLS_FALLBACK_NOTE

    def prepare(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> TemplateInput:
        """The record as the template sees it (toolcalls.py); the template's tool support is probed on first need."""
        if isinstance(tools, str):  # a JSON string, as LLaMA-Factory's files hold them
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tools is not JSON: {exc}") from None
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise ValueError(f"tools must be a list of function schemas, not {type(tools).__name__}")
        if tools or any(m.get("tool_calls") for m in messages):
            support = self._tool_support(tools or PROBE_TOOLS)
        else:
            support = (True, True)
        return template_input(messages, tools, support, self._special_tokens()[1])

    # -- rendering -------------------------------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: Sequence[Any] | None = None,
    ) -> str:
        """The chat template applied to `messages` (the empty string for none), as `encode` renders them."""
        inp = self.prepare(messages, tools)
        return self._apply(inp.messages, add_generation_prompt, inp.tools)

    def _apply(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: Any = None,
        chat_template: str | None = None,
    ) -> str:
        """apply_chat_template on messages the template may see as they are."""
        if not messages and not add_generation_prompt:
            return ""
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise ValueError(f"the chat template failed on the first {len(messages)} messages: {exc}") from None
        if not isinstance(text, str):
            raise ValueError("the chat template did not render to a string")
        return text

    def _fast_render(self, source: str, tools: Any) -> Callable[..., str] | None:
        """A renderer for the many renders of one conversation, or None.

        `apply_chat_template` spends most of its time copying the conversation into plain data, and jinja's
        `render` copies the template's globals into every context; our messages are plain data already, so the
        compiled template is run directly (`Template.new_context` with the globals copied once, `shared=True`)
        with the arguments apply_chat_template passes: about 10x faster. `_segments` compares it with
        `apply_chat_template` on each template's first conversations (with and without tools) and falls back for
        good on any difference."""
        if not self._fast_ok:
            return None
        if self._compiled is None or self._compiled[0] != source:
            try:
                self._compiled = (source, compile_chat_template(source))
            except Exception:  # a transformers without this helper: use the public path
                self._fast_ok = False
                return None
        compiled = self._compiled[1]
        try:
            fixed = {**compiled.globals, **self.tokenizer.special_tokens_map, "tools": tools, "documents": None}
            concat = compiled.environment.concat
        except AttributeError:  # not a jinja template as this code knows it: use the public path
            self._fast_ok = False
            return None

        def render(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
            if not messages and not add_generation_prompt:
                return ""
            variables = {**fixed, "messages": messages, "add_generation_prompt": add_generation_prompt}
            try:
                return concat(compiled.root_render_func(compiled.new_context(variables, shared=True)))
            except Exception as exc:
                raise ValueError(f"the chat template failed on the first {len(messages)} messages: {exc}") from None

        return render

    # -- segments --------------------------------------------------------------------------------------------------
    def segments(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> Segments:
        """The full render of a record and where its parts lie (see `Segments`; per message of `prepare`)."""
        return self._segments(self.prepare(messages, tools), set())

    def _segments(self, inp: TemplateInput, locate: set[int]) -> Segments:
        """Segments of a prepared record; `locate` names messages whose content must be found (typed spans).
        Windowed where allowed, with the checks and fallbacks of the module docstring."""
        messages, tools = inp.messages, inp.tools
        source = self._source(tools)
        checks = self._template_checks(source)

        def slow(msgs: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
            return self._apply(msgs, add_generation_prompt, tools)

        def name(k: int) -> str:
            return f"message {inp.source[k]}" if inp.source[k] >= 0 else "the tools' system message"

        render = self._fast_render(source, tools)
        with_tools = bool(tools) or any("tool_calls" in m for m in messages)
        if render is not None and checks.fast_checks[with_tools] > 0:
            checks.fast_checks[with_tools] -= 1
            reference = self._apply(messages, tools=tools)
            if self._differs(render, messages, reference):
                self._fast_ok = False  # for good: this template renders differently outside apply_chat_template
                render = None
        render = render or slow
        full = render(messages)

        windowed = checks.window_ok and len(messages) > self.window_chunk
        if windowed:
            try:
                seg = self._compute(messages, locate, render, True, name)
            except ValueError:
                seg = None
            if seg is not None and seg.text == full:
                if checks.checks_left <= 0:
                    return seg
                checks.checks_left -= 1
                checks.window_ok = False  # until the exhaustive method agrees (it may raise: then for good)
                reference_seg = self._compute(messages, locate, render, False, name)
                checks.window_ok = reference_seg == seg
                return reference_seg
        seg = self._compute(messages, locate, render, False, name)  # raises the template's own error
        if seg.text != full:
            raise AssertionError("SemanticTokenizer: the segments do not make up the render")
        if windowed:  # the windows failed where the exhaustive way works: this template is not window-local
            checks.window_ok = False
        return seg

    @staticmethod
    def _differs(render: Callable[..., str], messages: list[dict[str, Any]], full: str) -> bool:
        try:
            return render(messages) != full
        except ValueError:
            return True

    def _window_start(self, j: int) -> int:
        """Where the context of message j starts after message 0 (odd: j keeps its parity); 0 for all of it."""
        start = j - j % self.window_chunk - self.window_context
        start -= 1 - start % 2
        return start if start > 1 else 0

    def _compute(
        self,
        messages: list[dict[str, Any]],
        locate: set[int],
        render: Callable[..., str],
        windowed: bool,
        name: Callable[[int], str],
    ) -> Segments:
        """Segments from prefix renders (windowed: from renders of the message after its short context)."""
        specials = self._special_tokens()[1]
        text: list[str] = []
        starts: list[int] = []
        trained: list[tuple[int, int] | None] = []
        plain: list[tuple[int, int]] = []
        content: list[tuple[int, int, int] | None] = [None] * len(messages)
        pos, cached = 0, (0, 0, "")  # (window start, length, render) of the last render
        headers: dict[tuple[str, bool] | None, str] = {}  # generation prompts by the message before (windowed)
        for j, msg in enumerate(messages):
            start = self._window_start(j) if windowed else 0
            context = messages[:j] if start == 0 else [messages[0], *messages[start:j]]
            before = cached[2] if cached[:2] == (start, j) else render(context)
            after = render([*context, msg])
            cached = (start, j + 1, after)
            if not after.startswith(before):
                raise ValueError(
                    f"the chat template is not prefix-stable: rendering {j + 1} messages changes the text of the first "
                    f"{j}; hsa_train needs a template where adding a message only appends text"
                )
            segment = after[len(before) :]
            starts.append(pos)
            if msg["role"] == "assistant":
                last = context[-1] if context else None
                key = (last["role"], "tool_calls" in last) if last else None
                header = headers.get(key) if windowed else None
                if header is None:
                    prompt = render(context, add_generation_prompt=True)
                    if after.startswith(prompt) and len(prompt) >= len(before):
                        header = headers[key] = prompt[len(before) :]
                if header is None or not segment.startswith(header):
                    raise ValueError(
                        f"the chat template's generation prompt is not a prefix of the render of {name(j)} (an "
                        "assistant message); cannot tell the header from the content"
                    )
                trained.append((pos + len(header), pos + len(segment)))
            else:
                trained.append(None)
            found = specials.search(msg["content"]) if specials else None
            if found or j in locate:
                a, b, shift = self._locate_content(context, msg, before, segment, render, name(j), found)
                content[j] = (pos + a, pos + b, shift)
                if found:
                    plain.append((pos + a, pos + b))
            text.append(segment)
            pos += len(segment)
        return Segments("".join(text), starts, trained, plain, content)

    @staticmethod
    def _locate_content(
        context: list[dict[str, Any]],
        msg: dict[str, Any],
        before: str,
        segment: str,
        render: Callable[..., str],
        name: str,
        special: re.Match | None,
    ) -> tuple[int, int, int]:
        """Where a message's content lies in its segment: (start, end, where that text starts in the content).

        The template's text around the content (header, footer) is what it renders around a sentinel content. The
        template may trim or cut the content, but not add text of its own between them: then the text there is
        all content, and tokenizing it as plain text cannot swallow a token of the template."""
        probe = render([*context, {**msg, "content": CONTENT_SENTINEL}])
        around = probe[len(before) :].split(CONTENT_SENTINEL)
        if probe.startswith(before) and len(around) == 2:
            header, footer = around
            end = len(segment) - len(footer)
            if segment.startswith(header) and segment.endswith(footer) and end >= len(header):
                shift = msg["content"].find(segment[len(header) : end])
                if shift >= 0:
                    return len(header), end, shift
        if special is not None:
            raise ValueError(
                f"{name}: its content holds the special-token text {special.group()!r}, but the chat template "
                "rewrites the content, so it cannot be told apart from the template's own tokens; remove that text "
                "from the content"
            )
        raise ValueError(
            f"{name}: the chat template rewrites its content, so its typed spans cannot be placed in the render; "
            "give the message one semantic_type instead of spans"
        )

    def _special_tokens(self) -> tuple[frozenset[int], re.Pattern | None]:
        """The ids of the tokenizer's special tokens (and eos), and a regex matching their text (None for none).

        Only special tokens are control tokens here: `split_special_tokens` leaves other added tokens (Qwen3's
        `<think>`) as tokens, inside content too."""
        size = len(self.tokenizer)
        if self._specials is None or self._specials[0] != size:
            added = {i: t.content for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
            eos = self.tokenizer.eos_token_id
            ids = frozenset(added) | ({eos} if eos is not None else set())
            texts = sorted(set(added.values()), key=len, reverse=True)
            pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
            self._specials = (size, ids, pattern)
        return self._specials[1], self._specials[2]
