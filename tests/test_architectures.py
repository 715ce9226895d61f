"""The architecture matrix: every decoder family the README names, HSA through transformers' registries only.

For each family: λ = 0 equals the stock attention, a row's logits do not depend on the padding around it, the
backends agree with the eager reference (forward, and the gradients of the loss in λ and in the weights), and a
cached decode gives the logits of recomputing the whole sequence, past the sliding window where there is one.
flex runs its unfused path here (the same score_mod and block mask; compiled CPU flex has no backward);
test_flex.py runs the compiled kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
from archs import FAMILIES, SLIDING, SOFTCAP, VOCAB, tiny
from test_model import batch_of, sample

from hsa_train import enable_hsa
from hsa_train.model import flex

LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}
ZERO = dict.fromkeys(LAMBDAS, 0.0)


def backends(family: str) -> list[str]:
    return ["eager", "flex"] + ([] if family in SOFTCAP else ["sdpa"])


def training_backends(family: str) -> list[str]:
    """FlexAttention's backward needs CUDA."""
    return [b for b in backends(family) if b != "flex" or torch.cuda.is_available()]


@pytest.fixture(autouse=True)
def unfused_flex(monkeypatch):
    monkeypatch.setattr(flex, "use_compiled", lambda device, needs_grad: False)


@pytest.fixture(scope="module")
def stock_models():
    return {family: tiny(family) for family in FAMILIES}


def with_hsa(stock, backend: str, lambdas=LAMBDAS, **kwargs):
    return enable_hsa(copy.deepcopy(stock), lambdas=lambdas, backend=backend, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_lambda_equals_stock_attention(stock_models, family):
    stock = stock_models[family]
    ids, sem, mask = batch_of([sample(12, 1, VOCAB), sample(7, 2, VOCAB)], "right")
    real = mask.bool()
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask).logits
        for backend in backends(family):
            out = with_hsa(stock, backend, ZERO)(input_ids=ids, attention_mask=mask, semantic_ids=sem).logits
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5, msg=f"{family} {backend}")


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance_and_backends_agree(stock_models, family):
    """A row alone and in a right-padded batch, for every backend; every backend equals eager."""
    target = sample(9, 7, VOCAB)
    ids, sem, mask = batch_of([sample(14, 3, VOCAB), target, sample(4, 5, VOCAB)], "right")
    outs = {}
    with torch.no_grad():
        for backend in backends(family):
            model = with_hsa(stock_models[family], backend)
            alone = model(input_ids=target[0][None], semantic_ids=target[1][None]).logits[0]
            batched = model(input_ids=ids, attention_mask=mask, semantic_ids=sem).logits[1][: len(target[0])]
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5, msg=f"{family} {backend}")
            outs[backend] = alone
        stock = stock_models[family](input_ids=target[0][None]).logits[0]
    for backend, out in outs.items():
        torch.testing.assert_close(out, outs["eager"], atol=1e-5, rtol=1e-5, msg=f"{family} {backend} vs eager")
    assert (outs["eager"] - stock).abs().max() > 1e-3  # the bias does something


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_agrees_with_eager(stock_models, family):
    """The loss's gradients in learnable λ and in the input embeddings, per backend that trains here, against
    eager's (test_learnable.py checks flex's λ gradient on CPU, with frozen weights)."""
    ids, sem, mask = batch_of([sample(11, 4, VOCAB), sample(6, 6, VOCAB)], "right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for backend in training_backends(family):
        model = with_hsa(stock_models[family], backend, learnable=True)
        loss = model(input_ids=ids, attention_mask=mask, semantic_ids=sem, labels=labels).loss
        loss.backward()
        embeddings = model.get_input_embeddings().weight.grad
        grads[backend] = (model.hsa.raw.grad.clone(), embeddings.clone())
        assert torch.isfinite(grads[backend][1]).all() and grads[backend][0].abs().sum() > 0
    for backend, (lam, emb) in grads.items():
        torch.testing.assert_close(lam, grads["eager"][0], atol=1e-5, rtol=1e-4, msg=f"{family} {backend} λ")
        torch.testing.assert_close(emb, grads["eager"][1], atol=1e-5, rtol=1e-4, msg=f"{family} {backend} weights")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_recompute(stock_models, family):
    """Greedy generation with the KV cache: each step's logits are those of one forward over the whole sequence
    (generated tokens typed hsa.generated_type), past the sliding window where the family has one."""
    prompt, types = sample(6, 3, VOCAB)
    new = 8
    assert family not in SLIDING or len(prompt) + new > 2 * 4  # past the window of 4
    for backend in ["auto", *backends(family)]:
        model = with_hsa(stock_models[family], backend, generated_type="KEY_EVENT")
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                semantic_ids=types[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
            seq = out.sequences
            full_types = torch.cat([types, torch.full((new,), 1)])[None]  # KEY_EVENT is id 1
            full = model(input_ids=seq, semantic_ids=full_types, use_cache=False).logits[0]
        assert seq.shape[1] == len(prompt) + new
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(
                logits[0], full[len(prompt) - 1 + step], atol=1e-4, rtol=1e-4, msg=f"{family} {backend} step {step}"
            )


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2_vl"])
def test_a_run_tokenizes_as_its_exported_folder_reloads(tmp_path, family):
    """transformers 5 picks a folder's tokenizer class by its config's model type, and qwen2's class rebuilds the
    pre-tokenizer (digits one by one): the shipped tokenizer must be loaded as its exported folder will load it,
    or a deployed model reads its observations in tokens it was never trained on."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from hsa_train.model.loading import folder_source, load_processing, model_config

    fields = dict(FAMILIES[family])
    model_cfg = SimpleNamespace(
        name_or_path=None, tokenizer=None, chat_template=None, trust_remote_code=False, image_processor={},
        arch={"type": fields.pop("model_type"), **fields},
    )  # fmt: skip
    trained = load_processing(model_cfg).tokenizer
    config = model_config(model_cfg)
    config.save_pretrained(tmp_path)
    trained.save_pretrained(tmp_path)
    probe = "Obs: facing east, ahead 3, left wall; key 12 ahead 345 left\n<|im_start|>user"
    expected = trained(probe)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path)(probe)["input_ids"] == expected  # any tool's reload
    assert load_processing(folder_source(tmp_path), config).tokenizer(probe)["input_ids"] == expected  # ours
