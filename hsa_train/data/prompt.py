"""Prompts for generation: a conversation encoded up to where the model takes over, and the tokens it stops at.

Both are found through the template itself, the way training finds an assistant turn: a probe reply is appended
and encoded, and the prompt is everything before its first trained token. So a prompt is tokenized and typed
exactly as the same conversation is in training, whatever the template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_PROBE_REPLY = "ok"


class GenerationPrompts:
    """Mixed into SemanticTokenizer (it provides encode_detailed, encode_with_answer, render, _decode)."""

    def encode_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        generated_type: str | None = None,
    ) -> dict[str, list[int]]:
        """{"input_ids", "attention_mask", "semantic_ids"} to generate the next assistant message from: the
        conversation rendered with the generation prompt, tokens and types exactly as training has them before an
        assistant message's first trained token (the prompt ends at the cut inference makes). The generation
        prompt's own tokens (the assistant header) take `generated_type` (None: the default type), as a trained
        turn's header takes its message's type; pass the model's `hsa.generated_type`."""
        if not messages:
            raise ValueError("empty conversation: there is nothing to generate a reply to")
        probe = [*messages, {"role": "assistant", "content": _PROBE_REPLY, "semantic_type": generated_type}]
        limit, self.max_length = self.max_length, None
        try:
            encoding = self.encode_detailed(probe, tools)
        finally:
            self.max_length = limit
        if encoding.answer is None:
            raise ValueError("the chat template renders no assistant turn after these messages")
        start = encoding.answer[0]
        features = {k: encoding.features[k][:start] for k in ("input_ids", "attention_mask", "semantic_ids")}
        features.update(self._prompt_media(encoding.features))
        if not self._prompt_matches(features["input_ids"], messages, tools):
            raise ValueError(
                "the chat template's generation prompt is not where its assistant turns start (render(messages, "
                "add_generation_prompt=True) is not a prefix of the conversation with a reply): cannot encode a "
                "prompt for it"
            )
        return features

    def _prompt_matches(self, input_ids: list[int], messages: Sequence[Mapping[str, Any]], tools: Any) -> bool:
        """Whether the prompt's tokens decode to the template's render with the generation prompt."""
        return self._decode(input_ids) == self.render(messages, add_generation_prompt=True, tools=tools)

    def _prompt_media(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """What a prompt carries besides tokens (a vision tokenizer's pixels and grids); nothing for text."""
        return {}

    def stop_token_ids(self) -> list[int]:
        """The tokens generation stops at: the special token that ends an assistant turn in this template (the
        last token of a final answer, `<|im_end|>`, `<|eot_id|>`), and the tokenizer's eos."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
        features, answer = self.encode_with_answer(probe)
        stops = set()
        if answer is not None and features["input_ids"][answer[1] - 1] in self._special_tokens()[0]:
            stops.add(features["input_ids"][answer[1] - 1])
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return sorted(stops)
