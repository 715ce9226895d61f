"""The semantic-aware tokenizer: one chat-template render, one tokenization, a type and a label per token (SPEC §2).

Segments come from the template itself: message j owns the text that rendering j+1 messages adds to rendering j.
A token takes the type of the segment holding its first character, so the template's own tokens (role headers,
end-of-turn markers, a default system prompt) are typed like the message they belong to, for any template.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

from hsa_train.types import SemanticTypes

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")


class SemanticTokenizer:
    def __init__(
        self,
        tokenizer: Any,
        types: Sequence[str] | None = None,
        default_type: str | None = None,
        train_on: str = "assistant",
        max_length: int | None = None,
    ):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on={train_on!r}: use one of {TRAIN_ON}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: SemanticTokenizer needs character offsets; "
                "load the tokenizer with use_fast=True"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; set one (tokenizer.chat_template = ...) first")
        self.tokenizer = tokenizer
        self.types = SemanticTypes.from_names(types, default_type)
        self.train_on = train_on
        self.max_length = max_length
        self._compiled: tuple[str, Any] | None = None  # (template source, compiled template) for the fast path
        self._fast_ok = True

    # -- rendering ---------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages` (the empty string for none)."""
        if not messages and not add_generation_prompt:
            return ""
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                plain, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise ValueError(f"the chat template failed on the first {len(plain)} messages: {exc}") from None
        if not isinstance(text, str):
            raise ValueError("the chat template did not render to a string")
        return text

    def _fast_render(self):
        """A renderer for the many prefix renders of one conversation, or None.

        `apply_chat_template` spends most of its time copying the conversation into plain data; our messages are
        plain already, so the compiled template is called directly with the same arguments (about 5x faster).
        `segments` checks every conversation's full render against `apply_chat_template` and falls back for good
        on any difference, so the fast path can never change a result."""
        if not self._fast_ok:
            return None
        source = self.tokenizer.chat_template
        if self._compiled is None or self._compiled[0] != source:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._compiled = (source, _compile_jinja_template(source))
            except Exception:  # a transformers without this helper: use the public path
                self._fast_ok = False
                return None
        compiled, special = self._compiled[1], dict(self.tokenizer.special_tokens_map)

        def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
            if not messages and not add_generation_prompt:
                return ""
            plain = [{"role": m["role"], "content": m["content"]} for m in messages]
            try:
                return compiled.render(
                    messages=plain, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **special
                )
            except Exception as exc:
                raise ValueError(f"the chat template failed on the first {len(plain)} messages: {exc}") from None

        return render

    def segments(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[int], list[tuple[int, int] | None]]:
        """The full render, each message's segment start, and each assistant message's trained span."""
        render = self._fast_render() or self.render
        renders = [render(messages[:j]) for j in range(len(messages) + 1)]
        if render is not self.render and renders[-1] != self.render(messages):
            self._fast_ok = False  # for good: this template renders differently outside apply_chat_template
            render = self.render
            renders = [render(messages[:j]) for j in range(len(messages) + 1)]
        for j in range(1, len(renders)):
            if not renders[j].startswith(renders[j - 1]):
                raise ValueError(
                    f"the chat template is not prefix-stable: rendering {j} messages changes the text of the first "
                    f"{j - 1}; hsa_train needs a template where adding a message only appends text"
                )
        starts = [len(renders[j]) for j in range(len(messages))]
        trained: list[tuple[int, int] | None] = []
        for j, msg in enumerate(messages):
            if msg["role"] != "assistant":
                trained.append(None)
                continue
            prompt = render(messages[:j], add_generation_prompt=True)
            if not (renders[j + 1].startswith(prompt) and len(prompt) >= len(renders[j])):
                raise ValueError(
                    f"the chat template's generation prompt is not a prefix of assistant message {j}'s render; "
                    "cannot tell the header from the content"
                )
            trained.append((len(prompt), len(renders[j + 1])))
        return renders[-1], starts, trained

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
        """{"input_ids", "attention_mask", "labels", "semantic_ids"}: lists of int, one entry per token."""
        return self.encode_with_answer(messages)[0]

    def encode_with_answer(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, list[int]], tuple[int, int] | None]:
        """`encode`, plus the token span [start, end) of the final answer: the last assistant message's content
        and end-of-turn (what greedy decoding after its generation prompt must produce); None without one. The
        span does not depend on `train_on`, so exact-match evaluation means the same thing either way."""
        if not messages:
            raise ValueError("empty conversation: there are no messages to encode")
        seg_types = []
        for k, msg in enumerate(messages):
            try:
                seg_types.append(self.types.id_of(msg.get("semantic_type")))
            except KeyError as exc:
                raise ValueError(f"message {k}: {exc.args[0]}") from None
        text, starts, trained = self.segments(messages)

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids: list[int] = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        end_of_segments = len(text)
        default_id = self.types.default_id

        last_assistant = max((j for j, span in enumerate(trained) if span is not None), default=None)
        answer_chars = trained[last_assistant] if last_assistant is not None else None
        answer_tokens: list[int] = []

        semantic_ids: list[int] = []
        labels: list[int] = []
        for t, (tok, (first, _)) in enumerate(zip(input_ids, offsets)):
            seg = bisect_right(starts, first) - 1
            semantic_ids.append(seg_types[seg] if 0 <= seg and first < end_of_segments else default_id)
            if answer_chars is not None and answer_chars[0] <= first < answer_chars[1]:
                answer_tokens.append(t)
            if self.train_on == "all":
                labels.append(tok)
            else:
                span = trained[seg] if seg >= 0 else None
                labels.append(tok if span is not None and span[0] <= first < span[1] else IGNORE_INDEX)

        if len(input_ids) != len(semantic_ids) or len(input_ids) != len(labels):
            raise AssertionError("SemanticTokenizer: input_ids, semantic_ids and labels differ in length")
        decoded = self.tokenizer.decode(input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text:
            raise ValueError(
                "the tokenizer does not round-trip the rendered conversation (decode(encode(text)) != text); "
                "token types would be misaligned: use a tokenizer without normalisation"
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError("nothing to train on: the conversation has no assistant message content to learn")
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise ValueError(
                f"too long: {len(input_ids)} tokens > data.max_length={self.max_length} "
                "(raise data.max_length, or use data.on_error=skip to skip such records)"
            )
        features = {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": labels,
            "semantic_ids": semantic_ids,
        }
        answer = (answer_tokens[0], answer_tokens[-1] + 1) if answer_tokens and answer_tokens[0] > 0 else None
        return features, answer
