"""enable_hsa on whole transformers models: stock equivalence at λ = 0, padding invariance, packing, round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from hsa_train import enable_hsa
from hsa_train.model.loading import build_model, load_tokenizer

LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}
ZERO = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.0, "PROCESS_NOISE": 0.0}


def sample(length: int, seed: int, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=g), torch.randint(0, 3, (length,), generator=g)


def batch_of(rows, side: str, pad_id: int = 0, pad_type: int = 2):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    semantic_ids = torch.full((len(rows), width), pad_type)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (ids, sem) in enumerate(rows):
        sl = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[r, sl], semantic_ids[r, sl], attention_mask[r, sl] = ids, sem, 1
    return input_ids, semantic_ids, attention_mask


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_zero_lambda_equals_stock_sdpa(model_factory, clone, model_type, backend):
    stock = model_factory(model_type=model_type)
    hsa = enable_hsa(clone(stock), lambdas=ZERO, backend=backend)
    input_ids, semantic_ids, attention_mask = batch_of([sample(12, 1), sample(7, 2)], "right")
    with torch.no_grad():
        ref = stock(input_ids=input_ids, attention_mask=attention_mask).logits
        out = hsa(input_ids=input_ids, attention_mask=attention_mask, semantic_ids=semantic_ids).logits
    real = attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("head_scaling", ["none", "alibi"])
def test_padding_invariance(model_factory, backend, head_scaling):
    model = enable_hsa(model_factory(), lambdas=LAMBDAS, backend=backend, head_scaling=head_scaling)
    target = sample(9, 7)
    with torch.no_grad():
        alone = model(input_ids=target[0][None], semantic_ids=target[1][None]).logits[0]
        for side in ("right", "left"):
            input_ids, semantic_ids, attention_mask = batch_of([sample(14, 3), target, sample(4, 5)], side)
            out = model(input_ids=input_ids, attention_mask=attention_mask, semantic_ids=semantic_ids).logits[1]
            inside = out[attention_mask[1].bool()]
            torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-5)


def test_bias_changes_the_output_and_backends_agree(model_factory, clone):
    stock = model_factory()
    input_ids, semantic_ids, attention_mask = batch_of([sample(16, 1), sample(10, 2)], "left")
    with torch.no_grad():
        ref = stock(input_ids=input_ids, attention_mask=attention_mask).logits
        outs = {}
        for backend in ("eager", "sdpa"):
            model = enable_hsa(clone(stock), lambdas=LAMBDAS, backend=backend)
            outs[backend] = model(input_ids=input_ids, attention_mask=attention_mask, semantic_ids=semantic_ids).logits
    real = attention_mask.bool()
    torch.testing.assert_close(outs["eager"][real], outs["sdpa"][real], atol=1e-5, rtol=1e-5)
    assert (outs["sdpa"][real] - ref[real]).abs().max() > 1e-2


def test_packed_documents_do_not_see_each_other(model_factory):
    """Two documents in one row (positions restart, no attention_mask) give the logits each has alone."""
    model = enable_hsa(model_factory(), lambdas=LAMBDAS)
    (a, sa), (b, sb) = sample(6, 1), sample(5, 2)
    packed_ids, packed_sem = torch.cat([a, b])[None], torch.cat([sa, sb])[None]
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(
            input_ids=packed_ids, semantic_ids=packed_sem, position_ids=position_ids, use_cache=False
        ).logits[0]  # transformers detects packing only without a cache
        alone_a = model(input_ids=a[None], semantic_ids=sa[None]).logits[0]
        alone_b = model(input_ids=b[None], semantic_ids=sb[None]).logits[0]
    torch.testing.assert_close(packed[:6], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[6:], alone_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("how", ["attention_mask", "use_cache", "padded"])
def test_packed_documents_stay_apart_on_the_library_path(model_factory, backend, how):
    """The same with what a user's batch usually carries: an attention_mask (all ones, or right padding), or the
    default use_cache=True. transformers' own packing detection is off in each case; the HSA mask still holds."""
    model = enable_hsa(model_factory(), lambdas=LAMBDAS, backend=backend)
    (a, sa), (b, sb) = sample(6, 1), sample(5, 2)
    ids, sem = torch.cat([a, b])[None], torch.cat([sa, sb])[None]
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None]
    kwargs = {"use_cache": how == "use_cache"}
    if how != "use_cache":
        kwargs["attention_mask"] = torch.ones_like(ids)
    if how == "padded":  # right padding after the two documents
        ids, sem = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], 1), torch.cat([sem, torch.full((1, 3), 2)], 1)
        position_ids = torch.cat([position_ids, torch.arange(5, 8)[None]], 1)
        kwargs["attention_mask"] = torch.cat([torch.ones(1, 11), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        packed = model(input_ids=ids, semantic_ids=sem, position_ids=position_ids, **kwargs).logits[0]
        alone_a = model(input_ids=a[None], semantic_ids=sa[None]).logits[0]
        alone_b = model(input_ids=b[None], semantic_ids=sb[None]).logits[0]
    torch.testing.assert_close(packed[:6], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[6:11], alone_b, atol=1e-5, rtol=1e-5)


def test_labels_give_the_loss(model_factory):
    model = enable_hsa(model_factory(), lambdas=LAMBDAS)
    ids, sem = sample(10, 4)
    out = model(input_ids=ids[None], semantic_ids=sem[None], labels=ids[None])
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[1:])
    torch.testing.assert_close(out.loss, ref)


def test_round_trip_save_load(model_factory, tmp_path):
    model = enable_hsa(model_factory(), lambdas=LAMBDAS, backend="sdpa", head_scaling="alibi")
    ids, sem = sample(11, 9)
    with torch.no_grad():
        before = model(input_ids=ids[None], semantic_ids=sem[None]).logits
    model.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(None)
    loaded = build_model(str(tmp_path), None, tokenizer)
    assert loaded.config.hsa == model.config.hsa
    loaded = enable_hsa(loaded.eval())  # settings come back from the config
    assert loaded.config._attn_implementation == "hsa_sdpa"
    with torch.no_grad():
        after = loaded(input_ids=ids[None], semantic_ids=sem[None]).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_learnable_lambdas_get_gradients_and_stay_non_negative(model_factory):
    model = enable_hsa(model_factory(), lambdas=LAMBDAS, learnable=True)
    assert [n for n, p in model.named_parameters() if n.startswith("hsa.")] == ["hsa.raw"]
    ids, sem = sample(12, 4)
    model(input_ids=ids[None], semantic_ids=sem[None], labels=ids[None]).loss.backward()
    assert model.hsa.raw.grad is not None and model.hsa.raw.grad.abs().sum() > 0
    with torch.no_grad():
        model.hsa.raw.fill_(-1.0)
    assert model.hsa.values().tolist() == [0.0, 0.0, 0.0]


def test_missing_or_bad_semantic_ids_are_errors(model_factory):
    model = enable_hsa(model_factory(), lambdas=LAMBDAS)
    ids, sem = sample(6, 1)
    with pytest.raises(ValueError, match="needs semantic_ids"):
        model(input_ids=ids[None])
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        model(input_ids=ids[None], semantic_ids=torch.full((1, 6), 3))
    with pytest.raises(ValueError, match="expected \\(batch, seq_len\\)"):
        model(input_ids=ids[None], semantic_ids=sem[None, :4])


def test_settings_are_validated(model_factory):
    with pytest.raises(ValueError, match="unknown types"):
        enable_hsa(model_factory(), lambdas={"URGENT": 0.1})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        enable_hsa(model_factory(), lambdas={"KEY_EVENT": -0.1})
    with pytest.raises(ValueError, match="hsa.backend"):
        enable_hsa(model_factory(), backend="flash")


def test_custom_types(model_factory):
    model = enable_hsa(
        model_factory(),
        lambdas={"TASK": 0.0, "TOOL": 0.02, "NOISE": 0.2},
        types=["TASK", "TOOL", "NOISE"],
        default_type="NOISE",
    )
    assert model.config.hsa["types"] == ["TASK", "TOOL", "NOISE"]
    ids, sem = sample(6, 1)
    model(input_ids=ids[None], semantic_ids=sem[None])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_bf16_left_padding_stays_finite_and_close_to_fp32(model_factory, clone, backend):
    """Fully masked rows (left-padding queries) must not turn into NaN that later layers would spread."""
    fp32 = enable_hsa(model_factory(), lambdas=LAMBDAS, backend=backend)
    bf16 = clone(fp32).to(torch.bfloat16)
    input_ids, semantic_ids, attention_mask = batch_of([sample(12, 1), sample(5, 2)], "left")
    with torch.no_grad():
        ref = fp32(input_ids=input_ids, attention_mask=attention_mask, semantic_ids=semantic_ids).logits
        out = bf16(input_ids=input_ids, attention_mask=attention_mask, semantic_ids=semantic_ids).logits
    real = attention_mask.bool()
    assert out[real].isfinite().all()
    torch.testing.assert_close(out[real].float(), ref[real], atol=5e-2, rtol=5e-2)


def test_chat_template_override(tmp_path):
    from hsa_train.data import SemanticTokenizer

    bare = load_tokenizer(None)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="no chat_template"):
        SemanticTokenizer(load_tokenizer(str(tmp_path / "tok")))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chatml = SemanticTokenizer(load_tokenizer(str(tmp_path / "tok"), chat_template="chatml"))
    assert chatml.render(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    custom = tmp_path / "plain.jinja"
    custom.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    plain = SemanticTokenizer(load_tokenizer(str(tmp_path / "tok"), chat_template=str(custom)))
    assert plain.render(messages) == "user: hi\nassistant: hello\n"
    assert plain.encode(messages)["labels"].count(-100) < len(plain.encode(messages)["labels"])
    with pytest.raises(FileNotFoundError, match="model.chat_template"):
        load_tokenizer(None, chat_template=str(tmp_path / "missing.jinja"))


def test_tokenizer_takes_its_types_from_the_model_and_a_mismatch_is_named(tmp_path, tokenizer):
    """A model saved with other types: from_model gives the tokenizer those types (TOOL is id 1), and a default
    SemanticTokenizer next to it is an error that names both lists."""
    from transformers import AutoModelForCausalLM

    from hsa_train.data import SemanticCollator, SemanticTokenizer
    from hsa_train.model import check_types

    types = ["TASK", "TOOL", "NOISE"]
    saved = enable_hsa(
        tiny_model(vocab_size=len(tokenizer)), lambdas=dict.fromkeys(types, 0.05), types=types, default_type="NOISE"
    )
    saved.save_pretrained(tmp_path / "m")
    model = enable_hsa(AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
    st = SemanticTokenizer.from_model(model, tokenizer)
    assert st.types.names == tuple(types) and st.types.default == "NOISE"
    conv = [
        {"role": "user", "content": "ls", "semantic_type": "TASK"},
        {"role": "assistant", "content": "ok", "semantic_type": "TOOL"},
    ]
    feats = st.encode(conv)
    assert set(feats["semantic_ids"]) <= {0, 1, 2} and 1 in feats["semantic_ids"]
    assert SemanticCollator.from_tokenizer(st).pad_values["semantic_ids"] == 2  # NOISE pads
    check_types(model, st.types)
    with pytest.raises(ValueError) as err:
        check_types(model, SemanticTokenizer(tokenizer).types)
    assert "[TASK, TOOL, NOISE] (default NOISE)" in str(err.value)
    assert "[GLOBAL_CONDITION, KEY_EVENT, PROCESS_NOISE] (default PROCESS_NOISE)" in str(err.value)
