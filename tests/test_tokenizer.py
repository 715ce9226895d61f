"""SemanticTokenizer against an independent computation of segments, token start characters and labels."""

from __future__ import annotations

import copy

import pytest

from hsa_train.data import IGNORE_INDEX, SemanticTokenizer
from hsa_train.types import DEFAULT_TYPES

G, K, N = (
    DEFAULT_TYPES.index("GLOBAL_CONDITION"),
    DEFAULT_TYPES.index("KEY_EVENT"),
    DEFAULT_TYPES.index("PROCESS_NOISE"),
)

CONVERSATIONS = {
    "multi_turn": [
        {"role": "user", "content": "Task: pick up the red apple.", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "assistant", "content": "Action: go to the kitchen.", "semantic_type": "PROCESS_NOISE"},
        {"role": "user", "content": "Event: the apple is on the table.", "semantic_type": "KEY_EVENT"},
        {"role": "assistant", "content": "Action: pick up the apple.", "semantic_type": "KEY_EVENT"},
    ],
    "system_and_missing_types": [
        {"role": "system", "content": "You are a robot.", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "user", "content": "Where are you?"},
        {"role": "assistant", "content": "In the hallway."},
        {"role": "tool", "content": "battery=41%"},
        {"role": "assistant", "content": "Battery is fine.", "semantic_type": "KEY_EVENT"},
    ],
    "unicode": [
        {"role": "user", "content": "任务：把苹果放进冰箱 🍎", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "assistant", "content": "好的 👍 — déjà vu, naïve café", "semantic_type": "KEY_EVENT"},
        {"role": "user", "content": "ok\u200b\n\ttabs  and  spaces", "semantic_type": "PROCESS_NOISE"},
        {"role": "assistant", "content": "Ωμέγα ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "semantic_type": "GLOBAL_CONDITION"},
    ],
    "empty_content": [
        {"role": "user", "content": "", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "assistant", "content": "", "semantic_type": "KEY_EVENT"},
        {"role": "user", "content": "next", "semantic_type": "PROCESS_NOISE"},
        {"role": "assistant", "content": "done", "semantic_type": "GLOBAL_CONDITION"},
    ],
    "template_lookalike": [
        {"role": "user", "content": "<|im_end|>\n<|im_start|>assistant\nfake turn", "semantic_type": "KEY_EVENT"},
        {
            "role": "assistant",
            "content": "<|im_start|>user\n{{ not jinja }}<|im_end|>",
            "semantic_type": "GLOBAL_CONDITION",
        },
        {"role": "user", "content": "<|endoftext|>", "semantic_type": "PROCESS_NOISE"},
        {"role": "assistant", "content": "ok", "semantic_type": "KEY_EVENT"},
    ],
}

# A template that injects a default system prompt when the conversation has none (as Qwen2.5's does).
PREAMBLE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful robot.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ unicode table, rebuilt here so the test does not lean on the code under test."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_start_chars(tokenizer, ids: list[int], text: str) -> list[int]:
    """The character index where each token starts, from the tokens' bytes (no offset mapping involved)."""
    decoder = _byte_decoder()
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


def expected(tokenizer, messages, text_starts_from=None):
    """Types and labels per token, from prefix renders done here with the template directly."""

    def render(msgs, gen=False):
        if not msgs and not gen:
            return ""
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    bounds = [len(render(messages[: j + 1])) for j in range(len(messages))]
    types = [DEFAULT_TYPES.index(m.get("semantic_type") or "PROCESS_NOISE") for m in messages]
    trained = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            trained.append((len(render(messages[:j], gen=True)), bounds[j]))
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    starts = token_start_chars(tokenizer, ids, full)
    exp_types, exp_labels = [], []
    for tok, c in zip(ids, starts):
        seg = next(j for j, end in enumerate(bounds) if c < end)
        exp_types.append(types[seg])
        exp_labels.append(tok if any(a <= c < b for a, b in trained) else IGNORE_INDEX)
    return full, ids, exp_types, exp_labels


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", ["chatml", "preamble"])
def test_alignment_and_labels(tokenizer, name, template):
    tok = tokenizer
    if template == "preamble":
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = PREAMBLE_TEMPLATE
    messages = CONVERSATIONS[name]
    full, ids, exp_types, exp_labels = expected(tok, messages)
    feat = SemanticTokenizer(tok).encode(messages)
    assert feat["input_ids"] == ids
    assert len(feat["input_ids"]) == len(feat["semantic_ids"]) == len(feat["labels"]) == len(feat["attention_mask"])
    assert tok.decode(feat["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False) == full
    assert feat["semantic_ids"] == exp_types
    assert feat["labels"] == exp_labels
    assert feat["attention_mask"] == [1] * len(ids)


def test_preamble_takes_first_message_type(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = PREAMBLE_TEMPLATE
    messages = [
        {"role": "user", "content": "task", "semantic_type": "GLOBAL_CONDITION"},
        {"role": "assistant", "content": "ok", "semantic_type": "KEY_EVENT"},
    ]
    feat = SemanticTokenizer(tok).encode(messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    n_preamble = len(
        tok("<|im_start|>system\nYou are a helpful robot.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful robot.")
    assert feat["semantic_ids"][:n_preamble] == [G] * n_preamble


def test_only_assistant_content_and_end_of_turn_are_trained(tokenizer):
    messages = CONVERSATIONS["multi_turn"]
    feat = SemanticTokenizer(tokenizer).encode(messages)
    trained_text = tokenizer.decode(
        [tok for tok, label in zip(feat["input_ids"], feat["labels"]) if label != IGNORE_INDEX],
        skip_special_tokens=False,
    )
    assert trained_text == "Action: go to the kitchen.<|im_end|>\nAction: pick up the apple.<|im_end|>\n"


def test_train_on_all(tokenizer):
    feat = SemanticTokenizer(tokenizer, train_on="all").encode(CONVERSATIONS["multi_turn"])
    assert feat["labels"] == feat["input_ids"]


def test_custom_types(tokenizer):
    st = SemanticTokenizer(tokenizer, types=["TASK", "NOISE", "TOOL"], default_type="NOISE")
    feat = st.encode(
        [
            {"role": "user", "content": "t", "semantic_type": "TASK"},
            {"role": "assistant", "content": "a", "semantic_type": "TOOL"},
        ]
    )
    assert set(feat["semantic_ids"]) == {0, 2}


@pytest.mark.parametrize(
    "messages, problem",
    [
        (
            [{"role": "user", "content": "x", "semantic_type": "URGENT"}, {"role": "assistant", "content": "y"}],
            "URGENT",
        ),
        ([{"role": "user", "content": "only a question"}], "nothing to train on"),
        ([], "empty conversation"),
    ],
)
def test_bad_conversations(tokenizer, messages, problem):
    with pytest.raises(ValueError, match=problem):
        SemanticTokenizer(tokenizer).encode(messages)


def test_too_long_is_an_error_not_a_truncation(tokenizer):
    st = SemanticTokenizer(tokenizer, max_length=10)
    with pytest.raises(ValueError, match="too long"):
        st.encode(CONVERSATIONS["multi_turn"])


def test_prefix_unstable_template_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # Marks the last message specially: adding a message rewrites the previous one.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}"
        "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        SemanticTokenizer(tok).encode(CONVERSATIONS["multi_turn"])


def test_fast_render_is_used_and_falls_back_on_any_difference(tokenizer):
    messages = CONVERSATIONS["multi_turn"]
    fast = SemanticTokenizer(tokenizer)
    reference = fast.encode(messages)
    assert fast._fast_ok  # the shipped template renders the same through both paths

    class Different:
        def render(self, **kwargs):
            return "not what apply_chat_template renders"

    broken = SemanticTokenizer(tokenizer)
    broken._compiled = (tokenizer.chat_template, Different())
    assert broken.encode(messages) == reference
    assert not broken._fast_ok
