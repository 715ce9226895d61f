"""CPU proxies for what would fail or crawl on the first GPU: one dtype into every kernel under autocast, no graph
breaks (each would be a host sync on CUDA), a bounded number of flex kernels with no silent unfused fallback,
learnable λ under activation checkpointing, and generate's auto-compile."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_bias import LAMBDAS, FakeAttention, brute_force
from test_model import batch_of, sample
from transformers import DynamicCache, StaticCache

from hsa_train import enable_hsa
from hsa_train.model import flex
from hsa_train.model.attention import hsa_eager_attention, hsa_sdpa_attention
from hsa_train.model.context import HSAForwardContext
from hsa_train.model.mask import hsa_mask_plan


def _recording(fn, seen: list):
    def wrapped(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return fn(q, k, v, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_one_dtype_reaches_each_kernel_under_autocast(monkeypatch, backend):
    """fp32 weights under bf16 autocast hand the attention float32 q / k (rotary embeddings) and a bf16 v: every
    backend gives its kernel all three in bf16, and the result is the float64 formula to bf16 precision."""
    seen: list = []
    if backend == "sdpa":
        monkeypatch.setattr(F, "scaled_dot_product_attention", _recording(F.scaled_dot_product_attention, seen))
    if backend == "flex":
        real = flex._flex
        monkeypatch.setattr(flex, "_flex", lambda *a, **kw: _recording(real(*a, **kw), seen))
    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 24, 16
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D).bfloat16()
    semantic_ids = torch.randint(0, 3, (B, L))
    padding = torch.ones(B, L, dtype=torch.long)
    padding[1, :5] = 0
    plan = hsa_mask_plan(batch_size=B, q_length=L, kv_length=L, attention_mask=padding.bool())
    ctx = HSAForwardContext(semantic_ids, torch.tensor(LAMBDAS), "none", num_heads=H, new_tokens=L)
    attention = {"eager": hsa_eager_attention, "sdpa": hsa_sdpa_attention, "flex": flex.hsa_flex_attention}[backend]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = attention(FakeAttention().eval(), q, k, v, plan, scaling=D**-0.5, hsa_context=ctx)
    if backend == "eager":
        seen.append((weights.dtype, out.dtype, out.dtype))
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    ref = brute_force(q, k, v.float(), semantic_ids, padding, LAMBDAS, "none")
    real_rows = padding.bool()
    torch.testing.assert_close(out.double()[real_rows], ref[real_rows], atol=3e-2, rtol=3e-2)


def test_an_autocast_model_through_flex_gets_one_dtype(model_factory, monkeypatch):
    """The whole model (rotary float32 q / k, bf16 v): the dtypes the flex kernel sees."""
    seen: list = []
    real = flex._flex
    monkeypatch.setattr(flex, "_flex", lambda *a, **kw: _recording(real(*a, **kw), seen))
    model = enable_hsa(model_factory(), backend="flex")
    ids, sem, mask = batch_of([sample(16, 1), sample(9, 2)], "right")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask, semantic_ids=sem, use_cache=False)
    assert len(seen) == 2 and set(seen) == {(torch.bfloat16,) * 3}


CASES = {
    "eval sdpa": ("sdpa", "eval", False),
    "eval eager": ("eager", "eval", False),
    "eval flex": ("flex", "eval", False),
    "train sdpa": ("sdpa", "train", False),
    "train sdpa learnable": ("sdpa", "train", True),
    "train eager": ("eager", "train", False),
    "train eager learnable per head": ("eager", "train", "per_head"),
    "decode sdpa dynamic cache": ("sdpa", "decode", False),
    "decode sdpa static cache": ("sdpa", "static", False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_forward_compiles_without_a_graph_break(model_factory, clone, case):
    """torch.compile(fullgraph=True) refuses any graph break: a data-dependent check, `int()` of a tensor,
    `torch.tensor(python_int)` in the hot path. Each would stall a CUDA stream and split the graph. The compiled
    model gives what the uncompiled one gives (loss, λ gradients, the decode step's logits)."""
    backend, mode, learnable = CASES[case]
    torch._dynamo.reset()
    model = enable_hsa(model_factory(), backend=backend, learnable=learnable)
    twin = clone(model)
    ids, sem, mask = batch_of([sample(16, 1), sample(11, 2)], "left")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    if mode == "eval":
        with torch.no_grad():
            ours = compiled(input_ids=ids, attention_mask=mask, semantic_ids=sem, use_cache=False).logits
            ref = twin(input_ids=ids, attention_mask=mask, semantic_ids=sem, use_cache=False).logits
        torch.testing.assert_close(ours, ref)
    elif mode == "train":
        model.train(), twin.train()
        labels = ids.masked_fill(mask == 0, -100)
        losses = [
            m(input_ids=ids, attention_mask=mask, semantic_ids=sem, labels=labels, use_cache=False).loss
            for m in (compiled, twin)
        ]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1])
        if learnable:
            assert model.hsa.raw.grad is not None and model.hsa.raw.grad.abs().sum() > 0
            torch.testing.assert_close(model.hsa.raw.grad, twin.hsa.raw.grad, atol=1e-5, rtol=1e-4)
    else:  # prefill uncompiled, then one compiled decode step over the cache
        caches = [
            StaticCache(config=m.config, max_cache_len=32) if mode == "static" else DynamicCache(config=m.config)
            for m in (model, twin)
        ]
        nxt = torch.tensor([[5], [7]])
        step_mask, step_sem = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), torch.cat([sem, sem[:, :1]], 1)
        logits = []
        with torch.no_grad():
            for m, cache, fn in zip((model, twin), caches, (compiled, twin)):
                m(input_ids=ids, attention_mask=mask, semantic_ids=sem, past_key_values=cache, use_cache=True)
                out = fn(input_ids=nxt, attention_mask=step_mask, semantic_ids=step_sem, past_key_values=cache)
                logits.append(out.logits)
        torch.testing.assert_close(logits[0], logits[1])


def test_flex_buckets_twelve_lengths_into_a_few_kernels_and_never_runs_unfused(model_factory, monkeypatch):
    """12 batch lengths from 128 to 1536, padded and unpadded, through the collator and a model on compiled flex:
    a bounded number of kernels (7, one per bucket), dynamo never hits its recompile limit (it would then run flex
    unfused, materialising L x L: here it raises instead)."""
    from hsa_train.data.collator import SemanticCollator

    torch._dynamo.reset()
    monkeypatch.setattr(flex, "_compiled_flex", {})
    monkeypatch.setattr(flex, "_kernels", {})
    model = enable_hsa(model_factory(layers=1), backend="flex")
    collator = SemanticCollator(pad_token_id=0, bucket_lengths=True)
    lengths = [128, 200, 256, 300, 384, 450, 512, 700, 900, 1024, 1300, 1536]
    widths = set()
    # dynamo's own patch, not monkeypatch: dynamo's config is no plain module (pytest 9.2 deletes what it restores)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for n in lengths:
            for rows in ([n, n], [n, n - 57]):  # unpadded; the second row padded
                batch = collator(
                    [{"input_ids": [3] * r, "semantic_ids": [1] * r, "attention_mask": [1] * r} for r in rows]
                )
                widths.add(batch["input_ids"].shape[1])
                model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    semantic_ids=batch["semantic_ids"],
                    use_cache=False,
                )
    assert widths == {128, 256, 384, 512, 768, 1024, 1536}
    assert len(flex._kernels["cpu"]) == len(widths)  # the collator always gives the mask: one kernel per width


def test_flex_raises_the_recompile_limit_for_the_kernels_it_needs_and_stops_past_the_cap(monkeypatch, caplog):
    monkeypatch.setattr(flex, "_kernels", {})
    with torch._dynamo.config.patch(recompile_limit=2):
        with caplog.at_level(logging.INFO, logger="hsa_train.model.flex"):
            for n in range(3):
                flex._reserve("cuda", ("kernel", n))
        assert torch._dynamo.config.recompile_limit >= 3
        assert "recompile_limit raised from 2" in caplog.text
        flex._reserve("cuda", ("kernel", 0))  # known: nothing new
        for n in range(3, flex.MAX_KERNELS):
            flex._reserve("cuda", ("kernel", n))
        assert torch._dynamo.config.recompile_limit >= flex.MAX_KERNELS
        with pytest.raises(RuntimeError, match="batch lengths are not bucketed"):
            flex._reserve("cuda", ("kernel", "one too many"))


def test_flex_unfused_stops_before_a_long_cpu_sequence(monkeypatch):
    """λ gradients on CPU go through flex's unfused path (L x L scores): refused past a few thousand tokens."""
    with pytest.raises(RuntimeError, match="materialising 4097 x 4097 scores"):
        flex._flex(torch.device("cpu"), True, ((1, 2, 4097, 8), (1, 2, 4097, 8)))


def test_learnable_lambda_through_flex_under_checkpointing():
    """The per-key slopes come from the pre-hook (outside any checkpointed region), so recomputing a layer does
    not find them cached: with flex's unfused path, frozen inputs (only λ needs a gradient) and two checkpointed
    layers that share one forward context, the λ gradient equals the plain run's."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    B, H, Hkv, L, D = 2, 4, 2, 12, 8
    queries = [torch.randn(B, H, L, D) for _ in range(2)]
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    w = torch.randn(D, D) * 0.3  # a frozen projection after the attention
    semantic_ids = torch.randint(0, 3, (B, L))
    padding = torch.ones(B, L, dtype=torch.bool)
    padding[0, -3:] = False

    def run(checkpointed: bool) -> torch.Tensor:
        lam = torch.tensor(LAMBDAS, requires_grad=True)
        ctx = HSAForwardContext(semantic_ids, lam, "alibi", num_heads=H, new_tokens=L)
        plan = hsa_mask_plan(batch_size=B, q_length=L, kv_length=L, attention_mask=padding)

        def layer(query):
            out, _ = flex.hsa_flex_attention(FakeAttention().eval(), query, k, v, plan, hsa_context=ctx)
            return (out @ w).tanh()

        outs = [checkpoint(layer, q, use_reentrant=False) if checkpointed else layer(q) for q in queries]
        total = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        total.backward()
        return lam.grad

    plain, checkpointed = run(False), run(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain)


def test_generate_does_not_auto_compile_an_hsa_model(model_factory, caplog):
    """transformers compiles generate's forward with a static cache on an accelerator; an HSA model's
    semantic_ids grow every step (a recompile each), so HSA models decline it, saying so once."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    model = enable_hsa(model_factory())
    stock = model_factory()
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # transformers' own switch to treat the CPU as an accelerator
    config = GenerationConfig(compile_config=compile_config)
    cache = {"cache": StaticCache(config=model.config, max_cache_len=16)}
    assert stock._valid_auto_compile_criteria(dict(cache), config)  # what transformers would do
    with caplog.at_level(logging.INFO, logger="hsa_train.model.generation"):
        assert not model._valid_auto_compile_criteria(dict(cache), config)
    assert "auto-compile" in caplog.text


def test_train_compile_compiles_the_model_without_graph_breaks(tmp_path, monkeypatch):
    """`train.compile=true` on a run with HSA (sdpa on CPU), training and evaluation: dynamo compiles the model and
    records no graph break. (Breaks are dynamo's, whatever the backend: the eager backend skips inductor's code
    generation to keep the test fast.)"""
    from test_training import tiny_run
    from torch._dynamo.utils import counters

    from hsa_train.training.loop import train

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    metrics = train(*tiny_run(tmp_path, "train.compile=true", "train.eval_every=2"), tmp_path / "run")
    assert all(loss == loss for loss in metrics["train_losses"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
