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
    # up to the end-of-turn token generation stops at; the "\n" ChatML writes after it is trained, never generated
    assert tokenizer.decode(features["input_ids"][start:end]) == "It is on the table.<|im_end|>"
    assert features["labels"][end] == features["input_ids"][end] == tokenizer.convert_tokens_to_ids("Ċ")
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


def _overfit(model, sequences: list[list[int]], steps: int = 100):
    """Trains `model` to reproduce `sequences` token for token (seconds on a CPU, deterministic)."""
    width = max(map(len, sequences))
    ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in sequences])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _greedy_answer(model, ids: list[int], start: int, end: int, stop: int) -> list[int]:
    """What `generate` produces greedily after the answer's prompt, up to and including the stop token."""
    prompt = torch.tensor([ids[:start]])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=end - start + 3,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=stop,
    )[0, start:].tolist()
    return out[: out.index(stop) + 1] if stop in out else out


def test_exact_match_agrees_with_greedy_generation(tokenizer, model_factory):
    """Per sample, teacher-forced exact match holds exactly when greedy generation after the answer's prompt
    reproduces the answer and stops at the end-of-turn token, on a model overfit so that some answers are
    generated: one answer as trained, one with a different token, one after whose <|im_end|> the model predicts
    something else than ChatML's "\n" (which generation never reaches), and one the model runs past."""
    st = SemanticTokenizer(tokenizer)
    stop, newline = tokenizer.convert_tokens_to_ids(["<|im_end|>", "Ċ"])

    def chat(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    trained = [
        st.encode(chat("Task: find the red mug.", "It is on the table."))["input_ids"],
        st.encode(chat("Where is the key?", "Under the mat."))["input_ids"],
        st.encode(chat("Which way now?", "Go north, then east."))["input_ids"],
    ]
    assert trained[1][-1] == newline
    trained[1][-1] = tokenizer.pad_token_id  # after this <|im_end|> the model learns another token than "\n"
    model = _overfit(model_factory(vocab_size=len(tokenizer), layers=2), trained)

    samples = {
        "as trained": (chat("Task: find the red mug.", "It is on the table."), True),
        "one token differs": (chat("Task: find the red mug.", "It is on the chair."), False),
        "no newline after the end of turn": (chat("Where is the key?", "Under the mat."), True),
        "the model goes on": (chat("Which way now?", "Go north,"), False),
    }
    collator = SemanticCollator(tokenizer.pad_token_id)

    def forward(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    for name, (messages, expected) in samples.items():
        features, (start, end) = st.encode_with_answer(messages)
        ids = features["input_ids"]
        generated = _greedy_answer(model, ids, start, end, stop)
        batch = collator([features])
        batch["answer_span"] = torch.tensor([[start, end]])
        exact = summarize(eval_sums(forward, [batch], 3), TYPES)["exact_match"]
        assert exact == float(generated == ids[start:end]), name
        assert (generated == ids[start:end]) is expected, name  # the model really is overfit
        if name == "no newline after the end of turn":
            assert forward(batch)[0, end - 1].argmax().item() != newline  # the case this sample is about
