"""A piece of a rendered conversation tokenized on its own: `SemanticTokenizer.tokenize` cuts the render where
inference cuts it, and each piece between two cuts is one text to the tokenizer."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any


class Piece:
    """The tokens of the text between two cuts, [start, end) of the render, and where each token starts: read from
    the tokenizer's `Encoding` only where asked (building every token's offsets in Python was a fifth of encode's
    time), or given as a list of first characters (the plain-content path)."""

    __slots__ = ("start", "end", "ids", "_encoding", "_skip", "_shift", "_firsts")

    def __init__(
        self,
        start: int,
        end: int,
        ids: list[int],
        encoding: Any = None,
        skip: int = 0,
        shift: int = 0,
        firsts: list[int] | None = None,
    ):
        self.start, self.end, self.ids = start, end, ids
        self._encoding, self._skip, self._shift, self._firsts = encoding, skip, shift, firsts

    def tokens_before(self, pos: int) -> int:
        """How many of the piece's tokens start before character `pos` of the render (token starts never decrease
        along a text)."""
        if pos <= self.start:
            return 0
        if pos >= self.end:
            return len(self.ids)
        if self._firsts is not None:
            return bisect_left(self._firsts, pos)
        at, q = self._encoding.token_to_chars, pos - self._shift
        lo, hi = self._skip, self._skip + len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid)[0] < q:
                lo = mid + 1
            else:
                hi = mid
        return lo - self._skip
