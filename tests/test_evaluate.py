"""Final-answer exact match: the span it scores, and its agreement with greedy generation by stock transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.data.dataset import Sample, eval_batches
from hsa_train.training.evaluate import eval_sums, summarize

TYPES = ["GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"]
CONVERSATION = [
    {"role": "system", "content": "You are a robot.", "semantic_type": "GLOBAL_CONDITION"},
    {"role": "user", "content": "Task: find the red mug.", "semantic_type": "GLOBAL_CONDITION"},
    {"role": "assistant", "content": "Action: look around.", "semantic_type": "PROCESS_NOISE"},
    {"role": "user", "content": "Event: the red mug is on the table.", "semantic_type": "KEY_EVENT"},
    {"role": "assistant", "content": "It is on the table.", "semantic_type": "KEY_EVENT"},
]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_answer_span_is_the_last_assistant_message(tokenizer, train_on):
    st = SemanticTokenizer(tokenizer, train_on=train_on)
    features, (start, end) = st.encode_with_answer(CONVERSATION)
    assert features == st.encode(CONVERSATION)  # the SPEC's encode is unchanged
    assert tokenizer.decode(features["input_ids"][start:end]) == "It is on the table.<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(features["input_ids"][:start]) == prompt
    no_answer = SemanticTokenizer(tokenizer, train_on="all").encode_with_answer(CONVERSATION[:2])
    assert no_answer[1] is None


def _samples(tokenizer, n: int = 3) -> list[Sample]:
    st = SemanticTokenizer(tokenizer)
    out = []
    for k in range(n):
        messages = [dict(m) for m in CONVERSATION]
        messages[-1]["content"] = f"It is on table {k}."
        features, answer = st.encode_with_answer(messages)
        out.append(Sample({f: np.asarray(v, dtype=np.int32) for f, v in features.items()}, answer, f"x:{k}"))
    return out


def test_exact_match_counts_only_fully_right_answers(tokenizer):
    samples = _samples(tokenizer)
    collator = SemanticCollator(tokenizer.pad_token_id)
    batch = next(eval_batches(samples, 8, collator))
    vocab = len(tokenizer)
    wrong = {(1, samples[1].answer[0] + 1), (2, 3)}  # (row, position predicted wrong): row 1 in its answer, row 2 not

    def oracle(b):  # logits whose argmax is the true next token, except at `wrong`
        nxt = torch.roll(b["input_ids"], -1, dims=1)
        for row, pos in wrong:
            nxt[row, pos - 1] = (nxt[row, pos - 1] + 1) % vocab
        return torch.nn.functional.one_hot(nxt, vocab).float() * 10

    result = summarize(eval_sums(oracle, [batch], 3), TYPES)
    n_answer_tokens = sum(s.answer[1] - s.answer[0] for s in samples)
    assert result["answers"] == 3
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["answer_token_accuracy"] == pytest.approx((n_answer_tokens - 1) / n_answer_tokens)


def test_exact_match_agrees_with_greedy_generation(tokenizer, model_factory):
    """A sample whose answer is what `generate` produces greedily counts as exact; change one token and it
    does not."""
    model = model_factory(vocab_size=len(tokenizer), layers=1)
    prompt = torch.tensor([tokenizer.encode("user\nTask: find the red mug.\nassistant\n")])
    generated = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    start, end = prompt.shape[1], generated.shape[1]
    rows = [generated[0].clone(), generated[0].clone()]
    rows[1][end - 2] = (rows[1][end - 2] + 1) % len(tokenizer)
    batch = {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.ones(2, end, dtype=torch.long),
        "labels": torch.stack(rows),
        "semantic_ids": torch.zeros(2, end, dtype=torch.long),
        "answer_span": torch.tensor([[start, end], [start, end]]),
    }

    def forward(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    result = summarize(eval_sums(forward, [batch], 3), TYPES)
    assert result["answers"] == 2 and result["exact_match"] == 0.5
