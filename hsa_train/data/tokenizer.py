"""The semantic-aware tokenizer: one chat-template render, tokenized as one text (cut only where inference cuts
it), a type and a label per token (SPEC §2).

Segments come from the template itself: message j owns the text that rendering j+1 messages adds to rendering j.
A token takes the type of the segment holding its first character, so the template's own tokens (role headers,
end-of-turn markers, a default system prompt) are typed like the message they belong to, for any template.

Two things follow inference rather than the one-text tokenization:
- The text is cut where each assistant turn's generation prompt ends and where the turn ends: a model reads the
  prompt tokenized on its own and generates the rest, so a token may not straddle the header and the answer
  (`"Assistant: " + "Hello"` would start `" Hello"` in the untrained header; Qwen merges ChatML's `"\n"` with a
  content's `"\n\n"`). Trained tokens are then exactly the turn's own tokens, leading whitespace included.
- Message content is plain text: special-token text in it (`<|im_end|>`) is tokenized as characters, so content
  cannot end a turn early or forge a template's structure; only the template's own text yields special tokens.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from hsa_train.types import SemanticTypes

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")
# Stands in for a message's content to find where a template puts it: letters only, so trims and escapes keep it.
CONTENT_SENTINEL = "HSAxCONTENTxSENTINELxQZ"


class Segments(NamedTuple):
    """A conversation's full render and where its parts lie, in characters."""

    text: str
    starts: list[int]  # where each message's segment starts
    trained: list[tuple[int, int] | None]  # per message: an assistant turn's text after its generation prompt
    plain: list[tuple[int, int]]  # contents that spell special tokens, to tokenize as plain text


class Piece(NamedTuple):
    """The tokens of the text between two cuts, and the character each token starts at."""

    start: int
    end: int
    ids: list[int]
    firsts: list[int]


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
        self._specials: tuple[int, frozenset[int], re.Pattern | None] | None = None  # (vocab size, ids, regex)
        self._marks_start: bool | None = None

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, train_on: str = "assistant", max_length: int | None = None
    ) -> SemanticTokenizer:
        """The SemanticTokenizer for an HSA model: types and default type from the model's own settings
        (`model.config.hsa`), so ids mean for the tokenizer what they mean for the model's bias."""
        from hsa_train.model.hsa import model_types

        types = model_types(model)
        return cls(tokenizer, types.names, types.default, train_on, max_length)

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

    def segments(self, messages: Sequence[Mapping[str, Any]]) -> Segments:
        """The full render and where its parts lie (see `Segments`), from prefix renders: the template decides
        where each message begins, where each assistant turn's generation prompt ends, and where content lies."""
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
        specials = self._special_tokens()[1]
        plain = []
        for j, msg in enumerate(messages):
            found = specials.search(msg["content"]) if specials and isinstance(msg["content"], str) else None
            if found:
                plain.append(self._locate_content(messages, j, found.group(), render, renders))
        return Segments(renders[-1], starts, trained, plain)

    def _locate_content(
        self, messages: Sequence[Mapping[str, Any]], j: int, special: str, render, renders: list[str]
    ) -> tuple[int, int]:
        """The character span of message j's content in the full render.

        The template's text around the content (header, footer) is what it renders around a sentinel content. The
        template may trim or cut the content, but not add text of its own between them: then the text there is
        all content, and tokenizing it as plain text cannot swallow a token of the template."""
        probe = render([*messages[:j], {"role": messages[j]["role"], "content": CONTENT_SENTINEL}])
        segment = renders[j + 1][len(renders[j]) :]
        around = probe[len(renders[j]) :].split(CONTENT_SENTINEL)
        if probe.startswith(renders[j]) and len(around) == 2:
            header, footer = around
            end = len(segment) - len(footer)
            if segment.startswith(header) and segment.endswith(footer) and end >= len(header):
                if segment[len(header) : end] in messages[j]["content"]:
                    return len(renders[j]) + len(header), len(renders[j]) + end
        raise ValueError(
            f"message {j}: its content holds the special-token text {special!r}, but the chat template rewrites the "
            "content, so it cannot be told apart from the template's own tokens; remove that text from the content"
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

    # -- tokenizing --------------------------------------------------------------------------------------------
    def tokenize(self, seg: Segments) -> list[Piece]:
        """The rendered text as tokens, cut where inference cuts it: at the end of each assistant message's
        generation prompt (the model generates from there on) and at the end of its turn (where it stops).

        Each piece between cuts is tokenized as one text, so the template's text and the content merge as they
        would anyway; only pieces that hold special-token text of some content take the slow path."""
        cuts = sorted({0, len(seg.text), *(c for span in seg.trained if span is not None for c in span)})
        bounds = list(zip(cuts, cuts[1:]))
        pieces = []
        for (a, b), (ids, offsets) in zip(bounds, self._encode(seg.text, bounds, plain=False)):
            if any(x < b and a < y for x, y in seg.plain):
                ids, offsets = self._with_plain_content(seg, a, b, ids, offsets)
            pieces.append(Piece(a, b, ids, [first for first, _ in offsets]))
        return pieces

    def _with_plain_content(
        self, seg: Segments, a: int, b: int, ids: list[int], offsets: list[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Piece [a, b) again, with content as plain text: the special tokens of the template's own text stay,
        the text between them is tokenized with `split_special_tokens` (exactly the normal tokenization of it
        when no content spells a special token there)."""
        special_ids = self._special_tokens()[0]
        anchors = [
            (x, y, tok)
            for tok, (x, y) in zip(ids, offsets)
            if tok in special_ids and not any(p < y and x < q for p, q in seg.plain)
        ]
        ends = [*anchors, (b, b, None)]
        stretches, pos = [], a
        for x, y, _ in ends:
            stretches.append((pos, max(pos, x)))
            pos = max(pos, y)
        out_ids: list[int] = []
        out_offsets: list[tuple[int, int]] = []
        for (more_ids, more_offsets), (x, y, tok) in zip(self._encode(seg.text, stretches, plain=True), ends):
            out_ids += more_ids
            out_offsets += more_offsets
            if tok is not None:
                out_ids.append(tok)
                out_offsets.append((x, y))
        return out_ids, out_offsets

    def _encode(
        self, text: str, bounds: list[tuple[int, int]], plain: bool
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and character offsets (in `text`) of each text[a:b], tokenized as the continuation of what precedes
        it; `plain` tokenizes special-token text as ordinary text.

        A tokenizer that marks the start of every text it is given (SentencePiece's "▁" prefix) is given each
        piece after a newline, whose tokens are dropped again (the trick transformers' chat encoding uses);
        byte-level BPEs mark nothing, and get the piece as it is."""
        lead = "\n" if self._marks_text_start() else ""
        texts = [text[a:b] if a == 0 else lead + text[a:b] for a, b in bounds]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=plain)
        lead_ids = (
            self.tokenizer(lead, add_special_tokens=False, split_special_tokens=plain)["input_ids"] if lead else []
        )
        out = []
        for (a, b), ids, offsets in zip(bounds, enc["input_ids"], enc["offset_mapping"]):
            shift = a - (len(lead) if a else 0)
            if a and lead:
                if ids[: len(lead_ids)] == lead_ids:
                    ids, offsets = ids[len(lead_ids) :], offsets[len(lead_ids) :]
                else:  # the newline merged into the piece: take the piece alone
                    alone = self.tokenizer(
                        text[a:b], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=plain
                    )
                    ids, offsets, shift = alone["input_ids"], alone["offset_mapping"], a
            out.append((list(ids), [(x + shift, y + shift) for x, y in offsets]))
        return out

    def _marks_text_start(self) -> bool:
        """Whether the tokenizer adds something at the start of every text (then "x" twice does not decode as
        "xx")."""
        if self._marks_start is None:
            x = self.tokenizer("x", add_special_tokens=False)["input_ids"]
            self._marks_start = self._decode(x + x) != "xx"
        return self._marks_start

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
        """{"input_ids", "attention_mask", "labels", "semantic_ids"}: lists of int, one entry per token."""
        return self.encode_with_answer(messages)[0]

    def encode_with_answer(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, list[int]], tuple[int, int] | None]:
        """`encode`, plus the token span [start, end) of the final answer: what greedy decoding after the last
        assistant message's generation prompt must produce, i.e. its tokens up to and including the first special
        token (the end-of-turn token generation stops at: `<|im_end|>`, `<|eot_id|>`, eos), not the template's
        text after it (ChatML's "\n", trained but never generated); all of the turn when the template ends turns
        in plain text. None without an assistant message. The span does not depend on `train_on`, so exact-match
        evaluation means the same thing either way."""
        if not messages:
            raise ValueError("empty conversation: there are no messages to encode")
        seg_types = []
        for k, msg in enumerate(messages):
            try:
                seg_types.append(self.types.id_of(msg.get("semantic_type")))
            except KeyError as exc:
                raise ValueError(f"message {k}: {exc.args[0]}") from None
        seg = self.segments(messages)
        pieces = self.tokenize(seg)
        trained_spans = {span for span in seg.trained if span is not None}
        default_id = self.types.default_id

        input_ids: list[int] = []
        semantic_ids: list[int] = []
        labels: list[int] = []
        first_token: list[int] = []  # each piece's first token index
        for piece in pieces:
            first_token.append(len(input_ids))
            trained = self.train_on == "all" or (piece.start, piece.end) in trained_spans
            for tok, first in zip(piece.ids, piece.firsts):
                seg_index = bisect_right(seg.starts, first) - 1
                semantic_ids.append(seg_types[seg_index] if seg_index >= 0 else default_id)
                labels.append(tok if trained else IGNORE_INDEX)
            input_ids += piece.ids

        if len(input_ids) != len(semantic_ids) or len(input_ids) != len(labels):
            raise AssertionError("SemanticTokenizer: input_ids, semantic_ids and labels differ in length")
        if self._decode(input_ids) != seg.text:
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
        return features, self._answer_span(seg, pieces, first_token)

    def _answer_span(self, seg: Segments, pieces: list[Piece], first_token: list[int]) -> tuple[int, int] | None:
        """The final answer's token span (see `encode_with_answer`): the last assistant turn's piece, cut after
        its first special token (content is plain text, so that token is the template's own)."""
        last = next((span for span in reversed(seg.trained) if span is not None), None)
        special_ids = self._special_tokens()[0]
        for piece, start in zip(pieces, first_token):
            if (piece.start, piece.end) == last and start > 0:
                stop = next((n + 1 for n, tok in enumerate(piece.ids) if tok in special_ids), len(piece.ids))
                return start, start + stop
        return None
