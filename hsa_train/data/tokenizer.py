"""The semantic-aware tokenizer: one chat-template render, tokenized as one text (cut only where inference cuts
it), a type and a label per token (SPEC §2).

Segments come from the template itself: message j owns the text that rendering j+1 messages adds to rendering j
(render.py: computed in linear time, tools and tool calls included). A token takes the type of the segment holding
its first character, so the template's own tokens (role headers, end-of-turn markers, a default system prompt) are
typed like the message they belong to, for any template. Inside a message's content, a typed span (`spans`:
(start, end, type) in content characters) types the tokens whose first character lies in it.

Two things follow inference rather than the one-text tokenization:
- The text is cut where each assistant turn's generation prompt ends and where the turn ends: a model reads the
  prompt tokenized on its own and generates the rest, so a token may not straddle the header and the answer
  (`"Assistant: " + "Hello"` would start `" Hello"` in the untrained header; Qwen merges ChatML's `"\n"` with a
  content's `"\n\n"`). Trained tokens are then exactly the turn's own tokens, leading whitespace included.
- Message content is plain text: special-token text in it (`<|im_end|>`) is tokenized as characters, so content
  cannot end a turn early or forge a template's structure; only the template's own text yields special tokens.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from hsa_train.data.piece import Piece
from hsa_train.data.prompt import GenerationPrompts
from hsa_train.data.render import CONTENT_SENTINEL, Segments, TemplateRendering
from hsa_train.data.toolcalls import TOOLS_FALLBACK_NOTE, TemplateInput
from hsa_train.model.compat import encode_batch, fast_backend
from hsa_train.model.settings import model_types
from hsa_train.types import IGNORE_INDEX, TRAIN_ON, SemanticTypes, check_choice

__all__ = [
    "CONTENT_SENTINEL",
    "TOOLS_FALLBACK_NOTE",
    "Encoding",
    "Piece",
    "Segments",
    "SemanticTokenizer",
]


class Encoding(NamedTuple):
    """One encoded conversation (`SemanticTokenizer.encode_detailed`)."""

    features: dict[str, list[int]]  # input_ids, attention_mask, labels, semantic_ids
    answer: tuple[int, int] | None  # the final answer's token span (see `encode_with_answer`)
    message_index: list[int]  # per token: the record message whose segment holds its first character, -1 for none


class SemanticTokenizer(TemplateRendering, GenerationPrompts):
    def __init__(
        self,
        tokenizer: Any,
        types: Sequence[str] | None = None,
        default_type: str | None = None,
        train_on: str = "assistant",
        max_length: int | None = None,
        media: Any = None,
        train_reasoning: bool = True,
    ):
        """`media`: the media hook of a vision-language model's tokenizer (`data.vision.ImageMedia`, given by
        `VisionSemanticTokenizer`); None for a text model. Whether a tokenizer reads images is `media is not
        None`, nothing else. `train_reasoning`: whether an assistant message's reasoning block (a message's
        `reasoning`: its character range in the content, parts.with_reasoning) trains, or is context only."""
        check_choice("train_on", train_on, TRAIN_ON)
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
        self.train_reasoning = bool(train_reasoning)
        self.max_length = max_length  # None: no limit here (truncation to data.cutoff_len happens before)
        self.media = media
        self._marks_start: bool | None = None
        self._init_rendering()

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, train_on: str = "assistant", max_length: int | None = None
    ) -> SemanticTokenizer:
        """The SemanticTokenizer for an HSA model: types and default type from the model's own settings
        (`model.config.hsa`), so ids mean for the tokenizer what they mean for the model's bias."""
        types = model_types(model)
        return cls(tokenizer, types.names, types.default, train_on, max_length)

    # -- tokenizing --------------------------------------------------------------------------------------------
    def tokenize(self, seg: Segments, media: Sequence[tuple[int, int, list[int]]] = ()) -> list[Piece]:
        """The rendered text as tokens, cut where inference cuts it: at the end of each assistant message's
        generation prompt (the model generates from there on) and at the end of its turn (where it stops).
        `media` (start, end, ids): stretches of the render that are given as tokens (an image's placeholder and
        its vision tokens); their tokens all start at the stretch's first character.

        Each piece between cuts is tokenized as one text, so the template's text and the content merge as they
        would anyway; only pieces that hold special-token text of some content take the slow path."""
        atoms = {(a, b): ids for a, b, ids in media}
        cuts = {0, len(seg.text), *(c for span in seg.trained if span is not None for c in span)}
        cuts = sorted(cuts | {c for bound in atoms for c in bound})
        bounds = [bound for bound in zip(cuts, cuts[1:]) if bound not in atoms]
        pieces = [Piece(a, b, ids, firsts=[a] * len(ids)) for (a, b), ids in atoms.items()]
        for (a, b), (encoding, skip, shift) in zip(bounds, self._encode(seg.text, bounds, plain=False)):
            if seg.plain and any(x < b and a < y for x, y in seg.plain):
                pieces.append(self._with_plain_content(seg, a, b, encoding, skip, shift))
            else:
                pieces.append(Piece(a, b, encoding.ids[skip:] if skip else encoding.ids, encoding, skip, shift))
        return sorted(pieces, key=lambda piece: piece.start)

    def _with_plain_content(self, seg: Segments, a: int, b: int, encoding: Any, skip: int, shift: int) -> Piece:
        """Piece [a, b) again, with content as plain text: the special tokens of the template's own text stay,
        the text between them is tokenized with `split_special_tokens` (exactly the normal tokenization of it
        when no content spells a special token there)."""
        special_ids = self._special_tokens()[0]
        anchors = [
            (x + shift, y + shift, tok)
            for tok, (x, y) in zip(encoding.ids[skip:], encoding.offsets[skip:])
            if tok in special_ids and not any(p < y + shift and x + shift < q for p, q in seg.plain)
        ]
        ends = [*anchors, (b, b, None)]
        stretches, pos = [], a
        for x, y, _ in ends:
            stretches.append((pos, max(pos, x)))
            pos = max(pos, y)
        ids: list[int] = []
        firsts: list[int] = []
        for (more, more_skip, more_shift), (x, _, tok) in zip(self._encode(seg.text, stretches, plain=True), ends):
            ids += more.ids[more_skip:]
            firsts += [first + more_shift for first, _ in more.offsets[more_skip:]]
            if tok is not None:
                ids.append(tok)
                firsts.append(x)
        return Piece(a, b, ids, firsts=firsts)

    def _encode(self, text: str, bounds: list[tuple[int, int]], plain: bool) -> list[tuple[Any, int, int]]:
        """Each text[a:b] tokenized as the continuation of what precedes it: (the tokenizers `Encoding`, how many
        of its first tokens are not the piece's, the shift that puts its offsets in `text`); `plain` tokenizes
        special-token text as ordinary text.

        A tokenizer that marks the start of every text it is given (SentencePiece's "▁" prefix) is given each
        piece after a newline, whose tokens are skipped (the trick transformers' chat encoding uses); byte-level
        BPEs mark nothing, and get the piece as it is."""
        pieces = [text[a:b] for a, b in bounds]
        if not self._marks_text_start():
            return [(encoding, 0, a) for (a, _), encoding in zip(bounds, self._tokenize_batch(pieces, plain))]
        lead = "\n"
        lead_ids = self._tokenize_batch([lead], plain)[0].ids
        encoded = self._tokenize_batch(
            [piece if a == 0 else lead + piece for (a, _), piece in zip(bounds, pieces)], plain
        )
        out = []
        for (a, _), piece, encoding in zip(bounds, pieces, encoded):
            if not a:
                out.append((encoding, 0, a))
            elif encoding.ids[: len(lead_ids)] == lead_ids:
                out.append((encoding, len(lead_ids), a - len(lead)))
            else:  # the newline merged into the piece: take the piece alone
                out.append((self._tokenize_batch([piece], plain)[0], 0, a))
        return out

    def _tokenize_batch(self, texts: list[str], plain: bool) -> list[Any]:
        """The tokenizers `Encoding` of each text (no special tokens added). Through the tokenizers backend when it
        has no truncation or padding set (what `tokenizer(...)` does, without building a BatchEncoding per piece:
        that was a third of encode's time on long conversations), else through `tokenizer(...)`."""
        backend = fast_backend(self.tokenizer)
        settings = (getattr(backend, "truncation", 0), getattr(backend, "padding", 0))
        if backend is None or settings != (None, None):
            return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=plain).encodings
        return encode_batch(backend, texts, plain)

    def _marks_text_start(self) -> bool:
        """Whether the tokenizer adds something at the start of every text (then "x" twice does not decode as
        "xx")."""
        if self._marks_start is None:
            x = self.tokenizer("x", add_special_tokens=False)["input_ids"]
            self._marks_start = self._decode(x + x) != "xx"
        return self._marks_start

    def _decode(self, ids: list[int]) -> str:
        backend = fast_backend(self.tokenizer)
        if backend is not None:  # what tokenizer.decode does without clean-up, minus its copy of the ids
            return backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> dict[str, list[int]]:
        """{"input_ids", "attention_mask", "labels", "semantic_ids"}: lists of int, one entry per token."""
        return self.encode_detailed(messages, tools).features

    def encode_with_answer(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
    ) -> tuple[dict[str, list[int]], tuple[int, int] | None]:
        """`encode`, plus the token span [start, end) of the final answer: what greedy decoding after the last
        assistant message's generation prompt must produce, i.e. its tokens up to and including the first special
        token (the end-of-turn token generation stops at: `<|im_end|>`, `<|eot_id|>`, eos), not the template's
        text after it (ChatML's "\n", trained but never generated); all of the turn when the template ends turns
        in plain text. None without an assistant message. The span does not depend on `train_on`, so exact-match
        evaluation means the same thing either way."""
        encoding = self.encode_detailed(messages, tools)
        return encoding.features, encoding.answer

    def encode_detailed(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> Encoding:
        """`encode_with_answer`'s features and answer, and each token's message (`Encoding`).

        `messages`: dicts with role, content (str), semantic_type (a type name, None for `default_type`), and
        optionally spans [(start, end, type name)] in content characters and tool_calls (OpenAI style); `tools`:
        the record's function schemas. Tool messages are trained only with train_on="all"; train_on="last" trains
        the last assistant message only (its content and end-of-turn marker)."""
        for k, msg in enumerate(messages):
            if msg.get("images") or msg.get("videos"):
                raise ValueError(
                    f"image in a text-only model: message {k} holds images or videos; train a vision-language model "
                    "(model=tiny_qwen2_vl, or model.name_or_path=Qwen/Qwen2-VL-2B-Instruct)"
                )
        return self._encode_detailed(messages, tools)

    def _encode_detailed(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None, media: Any = None
    ) -> Encoding:
        """`encode_detailed`; `media(text)` gives the stretches of the render that are tokens already (see
        `tokenize`): never trained, and decoded as their tokens' text."""
        if not messages:
            raise ValueError("empty conversation: there are no messages to encode")
        inp = self.prepare(messages, tools)
        own, spans = self._message_types(messages, inp)
        thinking = {} if self.train_reasoning else self._reasoning_ranges(messages, inp)
        seg = self._segments(inp, {k for k, s in enumerate(spans) if s} | set(thinking))
        atoms = media(seg.text) if media is not None else []
        pieces = self.tokenize(seg, atoms)
        atom_starts = {a for a, _, _ in atoms}
        positions, mark_types, mark_messages = self._type_marks(seg, inp, own, spans)
        trained_spans = sorted(span for span in seg.trained if span is not None)
        if self.train_on == "last":  # the final decision trains; the turns before it are context
            trained_spans = trained_spans[-1:]
        span_starts = [a for a, _ in trained_spans]

        def in_trained(piece: Piece) -> bool:  # pieces never straddle a span's ends: they are cuts
            k = bisect_right(span_starts, piece.start) - 1
            return k >= 0 and piece.end <= trained_spans[k][1] and piece.start not in atom_starts

        input_ids: list[int] = []
        labels: list[int] = []
        first_token: list[int] = []  # each piece's first token index
        any_trained = False
        for piece in pieces:
            first_token.append(len(input_ids))
            input_ids += piece.ids
            trained = in_trained(piece) or (self.train_on == "all" and piece.start not in atom_starts)
            labels += piece.ids if trained else [IGNORE_INDEX] * len(piece.ids)
            any_trained = any_trained or (trained and bool(piece.ids))
        # A token takes the entry of the last mark at or before its first character: mark k covers the tokens from
        # the first one starting at or after it to the next mark's.
        piece_starts = [piece.start for piece in pieces]
        bounds = [self._token_at(pieces, piece_starts, first_token, pos) for pos in positions]
        bounds.append(len(input_ids))
        counts = np.diff(bounds)
        if bounds[0] != 0 or (counts < 0).any():
            raise AssertionError("SemanticTokenizer: type marks out of order")
        semantic_ids = np.repeat(mark_types, counts).tolist()
        message_index = np.repeat(mark_messages, counts).tolist()
        for k, (a, b) in thinking.items():  # a reasoning block is context: the tokens starting inside it
            begin, end, shift = seg.content[k]
            x, y = max(begin, begin + a - shift), min(end, begin + b - shift)
            first, last = (self._token_at(pieces, piece_starts, first_token, pos) for pos in (x, y))
            labels[first:last] = [IGNORE_INDEX] * (last - first)
        any_trained = any(label != IGNORE_INDEX for label in labels)

        if not (len(input_ids) == len(semantic_ids) == len(labels) == len(message_index)):
            raise AssertionError("SemanticTokenizer: input_ids, semantic_ids and labels differ in length")
        expected = seg.text
        for a, b, ids in reversed(atoms):
            expected = expected[:a] + self._decode(ids) + expected[b:]
        if self._decode(input_ids) != expected:
            raise ValueError(
                "the tokenizer does not round-trip the rendered conversation (decode(encode(text)) != text); "
                "token types would be misaligned: use a tokenizer without normalisation"
            )
        if not any_trained:
            raise ValueError("nothing to train on: the conversation has no assistant message content to learn")
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise ValueError(
                f"too long: {len(input_ids)} tokens > max_length={self.max_length} (raise the tokenizer's "
                "max_length, or skip such records with on_error=skip)"
            )
        features = {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": labels,
            "semantic_ids": semantic_ids,
        }
        return Encoding(features, self._answer_span(seg, pieces, first_token), message_index)

    @staticmethod
    def _reasoning_ranges(messages: Sequence[Mapping[str, Any]], inp: TemplateInput) -> dict[int, tuple[int, int]]:
        """Per rendered message: its reasoning block's character range in its content (record messages' own)."""
        ranges = {}
        for k, source in enumerate(inp.source):
            span = messages[source].get("reasoning") if source >= 0 else None
            if span is not None and span[1] > span[0]:
                ranges[k] = (int(span[0]), int(span[1]))
        return ranges

    @staticmethod
    def _token_at(pieces: list[Piece], piece_starts: list[int], first_token: list[int], pos: int) -> int:
        """The index of the first token starting at or after character `pos` (a token belongs where it starts)."""
        k = bisect_right(piece_starts, pos) - 1
        return first_token[k] + pieces[k].tokens_before(pos) if k >= 0 else 0

    def _message_types(
        self, messages: Sequence[Mapping[str, Any]], inp: TemplateInput
    ) -> tuple[list[int], list[list[tuple[int, int, int]]]]:
        """Per rendered message: its type id, and its non-empty typed spans (start, end, type id), sorted and
        checked; the inserted tools system message has the default type and no spans."""
        own: list[int] = []
        spans: list[list[tuple[int, int, int]]] = []
        for i in inp.source:
            if i < 0:
                own.append(self.types.default_id)
                spans.append([])
                continue
            msg = messages[i]
            try:
                own.append(self.types.id_of(msg.get("semantic_type")))
                spans.append(self._spans_of(msg))
            except KeyError as exc:
                raise ValueError(f"message {i}: {exc.args[0]}") from None
            except ValueError as exc:
                raise ValueError(f"message {i}: {exc}") from None
        return own, spans

    def _spans_of(self, msg: Mapping[str, Any]) -> list[tuple[int, int, int]]:
        """A message's typed spans: [(start, end, type id)], non-empty, sorted, not overlapping. A span is
        (start, end, type name) or {"start", "end", "semantic_type"}; a type name None means `default_type`."""
        raw = msg.get("spans")
        if not raw:
            return []
        size, out = len(msg["content"]), []
        for span in raw:
            if isinstance(span, Mapping):
                start, end, name = span.get("start"), span.get("end"), span.get("semantic_type")
            elif isinstance(span, (list, tuple)) and len(span) == 3:
                start, end, name = span
            else:
                raise ValueError(f"a span is (start, end, type), not {span!r}")
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size):
                raise ValueError(f"span {span!r} is not a character range of the content (length {size})")
            if start < end:
                out.append((start, end, self.types.id_of(name)))
        out.sort()
        for (_, end, _), (start, _, _) in zip(out, out[1:]):
            if start < end:
                raise ValueError(f"spans overlap at character {start} of the content")
        return out

    @staticmethod
    def _type_marks(
        seg: Segments, inp: TemplateInput, own: list[int], spans: list[list[tuple[int, int, int]]]
    ) -> tuple[list[int], list[int], list[int]]:
        """Where types change in the render: (positions, type ids, record message indices), sorted by position; a
        character takes the entry of the last position <= it (segment starts, then span starts and ends)."""
        positions: list[int] = []
        types: list[int] = []
        owners: list[int] = []
        for k, start in enumerate(seg.starts):
            owner = inp.source[k]
            positions.append(start)
            types.append(own[k])
            owners.append(owner)
            if spans[k]:
                begin, end, shift = seg.content[k]
                for a, b, type_id in spans[k]:
                    x, y = max(begin, begin + a - shift), min(end, begin + b - shift)
                    if x < y:
                        positions += (x, y)
                        types += (type_id, own[k])
                        owners += (owner, owner)
        return positions, types, owners

    def _answer_span(self, seg: Segments, pieces: list[Piece], first_token: list[int]) -> tuple[int, int] | None:
        """The final answer's token span (see `encode_with_answer`): the last assistant turn's piece, cut after
        its first special token (content is plain text, so that token is the template's own)."""
        last = next((span for span in reversed(seg.trained) if span is not None), None)
        special_ids = self._special_tokens()[0]
        for piece, start in zip(pieces, first_token):
            if last is not None and piece.start == last[0] and start > 0:
                stop = next((n + 1 for n, tok in enumerate(piece.ids) if tok in special_ids), len(piece.ids))
                return start, start + stop
        return None
