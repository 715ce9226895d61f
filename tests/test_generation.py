"""Generation with the bias: prompts encoded as training encodes them, `model.generate(semantic_ids=...)` greedy,
sampled, batched and through a LoRA adapter, real decoding in the final evaluation, and `python -m
hsa_train.generate` on a trained model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluate import CONVERSATION, TYPES

from hsa_train import enable_hsa
from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.data.dataset import Sample, eval_batches
from hsa_train.model.generation import generate_batch
from hsa_train.training.evaluate import ANSWER_SUMS, eval_sums, generated_answer_sums

LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}


def hsa_model(model_factory, tokenizer, **kwargs):
    return enable_hsa(model_factory(vocab_size=len(tokenizer)), lambdas=LAMBDAS, **kwargs)


def test_prompt_is_the_training_encoding_up_to_the_answer(tokenizer):
    """encode_prompt = the tokens and types training has before the last assistant message's first trained token;
    the generation prompt (its header) takes the generated type."""
    st = SemanticTokenizer(tokenizer)
    features, (start, _) = st.encode_with_answer(CONVERSATION)
    prompt = st.encode_prompt(CONVERSATION[:-1], generated_type="KEY_EVENT")  # the reply is KEY_EVENT
    assert prompt["input_ids"] == features["input_ids"][:start]
    assert prompt["semantic_ids"] == features["semantic_ids"][:start]
    assert tokenizer.decode(prompt["input_ids"]) == tokenizer.apply_chat_template(
        CONVERSATION[:-1], tokenize=False, add_generation_prompt=True
    )
    header = tokenizer.encode("<|im_start|>assistant\n")
    assert prompt["input_ids"][-len(header) :] == header
    noise = st.encode_prompt(CONVERSATION[:-1])["semantic_ids"]  # no generated type: the default one
    assert noise[-len(header) :] == [TYPES.index("PROCESS_NOISE")] * len(header)
    assert st.stop_token_ids() == sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id})


def test_generate_needs_semantic_ids_and_extends_them(model_factory, tokenizer):
    model = hsa_model(model_factory, tokenizer, generated_type="KEY_EVENT")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="needs semantic_ids"):
        model.generate(input_ids=ids, max_new_tokens=2)
    seen = []  # what each step's forward gets, recorded before the HSA pre-hook consumes it
    recorder = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["semantic_ids"].clone()), with_kwargs=True, prepend=True
    )
    model.generate(input_ids=ids, semantic_ids=torch.tensor([[0, 2, 2, 1]]), max_new_tokens=3, do_sample=False)
    recorder.remove()
    assert [s.tolist() for s in seen] == [[[0, 2, 2, 1]], [[0, 2, 2, 1, 1]], [[0, 2, 2, 1, 1, 1]]]


def test_batched_left_padded_generation_equals_one_at_a_time(model_factory, tokenizer):
    st = SemanticTokenizer(tokenizer)
    model = hsa_model(model_factory, tokenizer)
    prompts = [st.encode_prompt(CONVERSATION[:k]) for k in (2, 4, 1)]
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": st.stop_token_ids()}
    batched = generate_batch(model, prompts, tokenizer.pad_token_id, st.types.default_id, **options)
    for prompt, together in zip(prompts, batched):
        alone = generate_batch(model, [prompt], tokenizer.pad_token_id, st.types.default_id, **options)[0]
        assert together == alone
    assert any(len(out) == 6 for out in batched)


def test_sampling_is_seeded(model_factory, tokenizer):
    st = SemanticTokenizer(tokenizer)
    model = hsa_model(model_factory, tokenizer)
    prompt = st.encode_prompt(CONVERSATION[:2])
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(generate_batch(model, [prompt], 0, 2, max_new_tokens=12, do_sample=True, temperature=1.5)[0])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _overfit_hsa(model, st, conversations, steps=150):
    """Trains an HSA model on whole conversations (with their types) until it reproduces them."""
    collator = SemanticCollator.from_tokenizer(st)
    batch = collator([st.encode(c) for c in conversations])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "semantic_ids", "labels")})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model.eval()


def test_generated_exact_match_equals_teacher_forced(model_factory, tokenizer):
    """eval.generate: decoding for real with the cache and the bias gives the teacher-forced exact match, sample
    by sample, on a model that gets some answers right and some wrong."""
    st = SemanticTokenizer(tokenizer)

    def chat(question, answer):
        return [
            {"role": "user", "content": question, "semantic_type": "GLOBAL_CONDITION"},
            {"role": "assistant", "content": answer, "semantic_type": "KEY_EVENT"},
        ]

    trained = [chat("Task: find the red mug.", "It is on the table."), chat("Where is the key?", "Under the mat.")]
    model = _overfit_hsa(hsa_model(model_factory, tokenizer), st, trained)
    evaluated = [*trained, chat("Task: find the red mug.", "It is on the chair."), chat("Where?", "Under it.")]
    samples = []
    for k, messages in enumerate(evaluated):
        features, answer = st.encode_with_answer(messages)
        samples.append(Sample({f: np.asarray(v, dtype=np.int32) for f, v in features.items()}, answer, f"x:{k}"))
    collator = SemanticCollator.from_tokenizer(st)

    def forward(b):
        return model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], semantic_ids=b["semantic_ids"]
        ).logits

    per_sample = []
    for sample in samples:
        forced = eval_sums(forward, eval_batches([sample], 1, collator), 3)[-len(ANSWER_SUMS) :]
        decoded = generated_answer_sums(model, eval_batches([sample], 1, collator), collator, torch.device("cpu"))
        assert forced[:2] == decoded[:2]  # answers, exact
        per_sample.append(decoded[1])
    assert per_sample[:2] == [1.0, 1.0] and per_sample[2] == 0.0  # the model really is overfit
    batched = generated_answer_sums(model, eval_batches(samples, 3, collator), collator, torch.device("cpu"))
    assert batched[:2] == [4.0, sum(per_sample)]


def test_lora_adapter_generates_with_the_bias(model_factory, tokenizer, tmp_path):
    """A LoRA model (peft wraps the HSA model) takes semantic_ids in generate, and the bias acts there."""
    from peft import LoraConfig, get_peft_model

    st = SemanticTokenizer(tokenizer)
    prompt = st.encode_prompt(CONVERSATION[:4])
    model = get_peft_model(hsa_model(model_factory, tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.eval()
    options = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    ids = torch.tensor([prompt["input_ids"]])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        semantic_ids=torch.tensor([prompt["semantic_ids"]]),
        **options,
    )
    with torch.no_grad():
        model.base_model.model.hsa.raw.zero_()
    plain = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        semantic_ids=torch.tensor([prompt["semantic_ids"]]),
        **options,
    )
    assert (out.logits[0] - plain.logits[0]).abs().max() > 1e-3


def test_generate_cli_on_a_trained_model(tmp_path, small_data):
    """Train the default tiny model briefly (its dataset types `Event:` lines by a rule), then reply to
    conversations (one ends with an assistant message: it is regenerated, and written as the reference; an
    untyped `Event:` message is typed by the rule saved with the model), and chat with typed turns."""
    import subprocess
    import sys

    from conftest import cli_env, run_cli

    run_dir = tmp_path / "run"
    done = run_cli(
        "data.train_files=[]", "export.typing_dataset=small",
        f"data.datasets=[{{path:'{small_data}',semantic_type_rules:[{{pattern:'^Event:',type:KEY_EVENT}}]}}]",
        "train.max_steps=2", "logging.progress=none", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((run_dir / "model" / "hsa_rules.json").read_text())
    assert saved["default"] == "small" and saved["cutoff_len"] == 2048 and saved["keep_types"] == ["GLOBAL_CONDITION"]
    rule = {"pattern": "^Event:", "type": "KEY_EVENT", "role": None}
    assert saved["datasets"]["small"]["semantic_type_rules"] == [rule]
    untyped = [{k: v for k, v in m.items() if k != "semantic_type"} for m in CONVERSATION[:4]]
    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": untyped}) + "\n")
    out = tmp_path / "replies.jsonl"
    cmd = [sys.executable, "-m", "hsa_train.generate", str(run_dir / "model"), "--input", str(convs)]
    result = subprocess.run(
        [*cmd, "--output", str(out), "--max-new-tokens", "8", "--batch-size", "2"],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["reference"] == CONVERSATION[-1]["content"] and "reference" not in rows[1]
    assert [{k: v for k, v in m.items() if k != "type_rule"} for m in rows[0]["messages"]] == CONVERSATION[:-1]
    assert {m["type_rule"] for m in rows[0]["messages"]} == {"explicit"}
    assert [(m["semantic_type"], m["type_rule"]) for m in rows[1]["messages"]] == [
        ("PROCESS_NOISE", "default"), ("PROCESS_NOISE", "default"), ("PROCESS_NOISE", "default"),
        ("KEY_EVENT", "rule:0:^Event:"),
    ]  # fmt: skip
    assert all(isinstance(r["reply"]["content"], str) and r["reply"]["role"] == "assistant" for r in rows)
    chat = subprocess.run(
        [sys.executable, "-m", "hsa_train.generate", str(run_dir / "model"), "--chat", "--max-new-tokens", "4"],
        input="/type KEY_EVENT\nThe door is open.\n/type NOPE\n/quit\n",
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "[KEY_EVENT] you>" in chat.stdout and "model>" in chat.stdout and "unknown type 'NOPE'" in chat.stdout
    bad = subprocess.run([*cmd[:-2]], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert bad.returncode == 2 and "--input FILE" in bad.stderr


def test_a_run_with_eval_generate_decodes_its_final_evaluation(tmp_path):
    """eval.generate=true: the same run's final exact match, now by decoding, and marked as such; the loss is
    untouched (teacher-forced either way)."""
    from test_training import tiny_run

    from hsa_train.training.loop import train

    forced = train(*tiny_run(tmp_path, "train.max_steps=6"), tmp_path / "forced")
    decoded = train(*tiny_run(tmp_path, "train.max_steps=6", "eval.generate=true"), tmp_path / "decoded")
    assert forced["eval_answers_by"] == "teacher_forcing" and decoded["eval_answers_by"] == "generation"
    assert decoded["eval_loss"] == forced["eval_loss"]
    assert decoded["eval_exact_match"] == forced["eval_exact_match"]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_a_static_cache_decodes_like_the_dynamic_one(family, backend, monkeypatch):
    """cache_implementation="static": slots past the end (masked) and, with a window, a rolling buffer; the keys
    keep their types either way."""
    from archs import tiny

    model = enable_hsa(tiny(family), lambdas=LAMBDAS, backend=backend)
    ids = torch.tensor([[5, 9, 3, 7, 11, 4]])
    types = torch.tensor([[0, 2, 1, 2, 2, 1]])
    options = dict(
        max_new_tokens=7, min_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        dynamic = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), semantic_ids=types, **options)
        static = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), semantic_ids=types, cache_implementation="static",
            **options,
        )  # fmt: skip
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for a, b in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
