"""How the next token is chosen, and when a reply ends: greedy or sampled (temperature, top-p), seeded per reply
so that a reply does not depend on which others share its batch; stop tokens from the template, stop strings
from the caller."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeOptions:
    """One reply's decoding. temperature 0 is greedy; `seed` None draws one; `stop` strings end the reply (not
    included in it), as the template's stop tokens do."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: give an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: give a number in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: give a number in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise ValueError("stop: give up to 4 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Chooses one reply's tokens; its own generator makes a seeded reply reproducible in any batch."""

    def __init__(self, options: DecodeOptions, device: torch.device):
        self.options = options
        self.generator = None
        if not options.greedy:
            self.generator = torch.Generator(device=device)
            if options.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(options.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits (V,)."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.options.temperature, dim=-1)
        if self.options.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.options.top_p  # the top token always stays
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Decoding:
    """One reply as it is decoded: its tokens, its text, and whether (and why) it has ended."""

    def __init__(self, decode, options: DecodeOptions, stop_ids: Sequence[int]):
        self.decode, self.options, self.stop_ids = decode, options, set(stop_ids)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._sent = 0  # characters handed out by `delta`

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.text = self.decode(self.tokens[:-1])
            return
        self.text = self.decode(self.tokens)
        for stop in self.options.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
                return
        if len(self.tokens) >= self.options.max_new_tokens:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> str:
        """The text not handed out yet that can no longer change: held back while it might be the start of a stop
        string or ends in a partial character."""
        text = self.text
        if not self.done:
            end = len(text)
            for stop in self.options.stop:  # a stop string's beginning at the end of the text waits
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        end = min(end, len(text) - k)
                        break
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
            end = max(end, self._sent)
            text = text[:end]
        out, self._sent = text[self._sent :], len(text)
        return out
