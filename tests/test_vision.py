"""Qwen2-VL with images: HSA reaches the language model only, image tokens take their message's type, and a
sample's logits do not depend on its batch (padding, packing), checked against the stock transformers model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hsa_train import enable_hsa
from hsa_train.config import bundled_path
from hsa_train.data import SemanticCollator
from hsa_train.data.collator import PackedCollator
from hsa_train.data.tokenizer import IGNORE_INDEX
from hsa_train.data.vision import VisionSemanticTokenizer
from hsa_train.model.loading import add_vision_tokens, build_model, load_tokenizer
from hsa_train.model.vision import VISION_TOKENS, vision_inputs, vision_tower

ARCH = {
    "type": "qwen2_vl",
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]},
    },
    "vision_config": {"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
}
ARCH_25 = {  # Qwen2.5-VL: windowed vision attention with full-attention blocks, a separate merger width
    **ARCH,
    "type": "qwen2_5_vl",
    "vision_config": {
        "depth": 2,
        "hidden_size": 16,
        "out_hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "fullatt_block_indexes": [1],
        "window_size": 56,
    },
}
FAMILIES = {"qwen2_vl": ARCH, "qwen2_5_vl": ARCH_25}
IMAGES = Path(bundled_path("vl_demo/images"))
SCENE, NOISE = str(IMAGES / "scene_red_top_left.png"), str(IMAGES / "noise_00.png")


@pytest.fixture(scope="module")
def vl_tokenizer():
    tok = load_tokenizer(None)
    add_vision_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def st(vl_tokenizer):
    from transformers import AutoImageProcessor

    from hsa_train.model.loading import bundled_image_processor_dir

    return VisionSemanticTokenizer(vl_tokenizer, AutoImageProcessor.from_pretrained(bundled_image_processor_dir()))


def vl_model(tokenizer, seed: int = 0, family: str = "qwen2_vl"):
    torch.manual_seed(seed)
    return build_model(None, FAMILIES[family], tokenizer).eval()


def conversation(images: list[str], task_type: str = "GLOBAL_CONDITION") -> list[dict]:
    msgs = [{"role": "user", "content": "Task: remember the marker.", "semantic_type": task_type}]
    for k, image in enumerate(images):
        kind = "KEY_EVENT" if k == 0 else None
        msgs.append({"role": "user", "content": f"Frame {k}: <image>", "semantic_type": kind, "images": [image]})
        msgs.append({"role": "assistant", "content": f"Step {k}.", "semantic_type": None})
    return msgs


def model_inputs(model, batch: dict, hsa: bool = True) -> dict:
    keys = ("input_ids", "position_ids") if "position_ids" in batch else ("input_ids", "attention_mask")
    inputs = {k: batch[k] for k in keys}
    if hsa:
        inputs["semantic_ids"] = batch["semantic_ids"]
    inputs.update(vision_inputs(model, batch))
    return inputs


def test_image_tokens_take_their_message_type_and_are_never_labels(st, vl_tokenizer):
    """Each placeholder becomes <|vision_start|>, grid/4 image tokens, <|vision_end|>: typed like the message
    (or the span) holding it, labels -100 even with train_on=all; the text around them is the template's."""
    vocab = vl_tokenizer.get_vocab()
    start, end, pad = (
        vocab[VISION_TOKENS[k]] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id")
    )
    msgs = conversation([SCENE, NOISE, SCENE])
    msgs.append(
        {
            "role": "user",
            "content": "Look: <image> and <image>",
            "semantic_type": "PROCESS_NOISE",
            "images": [NOISE, SCENE],
            "spans": [(len("Look: "), len("Look: <image>"), "KEY_EVENT")],  # the first image only
        }
    )
    msgs.append({"role": "assistant", "content": "Done.", "semantic_type": None})
    types = st.types
    expected = [
        types.id_of("KEY_EVENT"),
        types.default_id,
        types.default_id,
        types.id_of("KEY_EVENT"),
        types.default_id,
    ]
    for train_on in ("assistant", "all"):
        st.train_on = train_on
        enc = st.encode_detailed(msgs)
        ids, sem, labels = (enc.features[k] for k in ("input_ids", "semantic_ids", "labels"))
        grids = enc.features["image_grid_thw"]
        assert len(ids) == len(sem) == len(labels) == len(enc.message_index)
        starts = [i for i, t in enumerate(ids) if t == start]
        assert len(starts) == len(grids) == 5
        for k, (s, grid) in enumerate(zip(starts, grids)):
            n = int(grid.prod()) // 4
            assert ids[s + 1 : s + 1 + n] == [pad] * n and ids[s + 1 + n] == end
            assert set(sem[s : s + n + 2]) == {expected[k]}
            assert set(labels[s : s + n + 2]) == {IGNORE_INDEX}
        assert sum(t == pad for t in ids) == sum(int(g.prod()) // 4 for g in grids)
        assert enc.features["pixel_values"].shape == (int(grids.prod(axis=1).sum()), 3 * 2 * 14 * 14)
        # without the vision tokens, the text is the template's render of the conversation
        text = vl_tokenizer.decode([t for t in ids if t not in (start, end, pad)], skip_special_tokens=False)
        plain = [{k: m[k] for k in ("role", "content")} for m in msgs]
        rendered = vl_tokenizer.apply_chat_template(plain, tokenize=False).replace("<image>", "")
        assert text == rendered
    st.train_on = "assistant"


def test_bad_images_name_the_problem(st, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    narrow, extreme = tmp_path / "narrow.png", tmp_path / "extreme.png"
    Image.new("RGB", (3000, 20)).save(narrow)  # resized to 1344 x 28 (a side stays at 28): 37,632 > 112 x 112
    Image.new("RGB", (3000, 10)).save(extreme)  # an aspect ratio Qwen2-VL's resize refuses
    cases = [
        ([{"role": "user", "content": "<image>", "images": [str(tmp_path / "no.png")]}], "missing image: message 0"),
        ([{"role": "user", "content": "<image>", "images": [str(broken)]}], "unreadable image: message 0 image 0"),
        ([{"role": "user", "content": "<image> <image>", "images": [SCENE]}], "placeholder count: message 0 has 2"),
        ([{"role": "user", "content": "no placeholder", "images": [SCENE]}], "placeholder count: message 0 has 0"),
        (
            [{"role": "user", "content": "<image>", "images": [7]}],
            "unreadable image: message 0 image 0: .int. is not a path",
        ),
        ([{"role": "user", "content": "<image>", "images": [{"x": 1}]}], "unreadable image: message 0 image 0: an ima"),
        (
            [{"role": "user", "content": "<image>", "images": [SCENE, str(narrow)], "semantic_type": None}],
            "placeholder count",
        ),
        (
            [{"role": "user", "content": "<image><image>", "images": [SCENE, str(narrow)]}],
            "image too large: message 0 image 1: 3000x20 pixels still has 37632 after resizing > max_pixels 12544",
        ),
        (
            [{"role": "user", "content": "<image>", "images": [str(extreme)]}],
            "image not processable: message 0 image 0: absolute aspect ratio must be smaller than 200",
        ),
    ]
    for msgs, problem in cases:
        with pytest.raises(ValueError, match=problem):
            st.encode([*msgs, {"role": "assistant", "content": "ok"}])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_keeps_its_own_attention(vl_tokenizer, st, family):
    """enable_hsa switches the language model only: the vision tower's outputs in a forward with images are
    the stock model's, bit for bit, and its attention implementation is unchanged."""
    stock = vl_model(vl_tokenizer, family=family)
    hsa = enable_hsa(copy.deepcopy(stock), {"KEY_EVENT": 0.5, "PROCESS_NOISE": 1.0}, "eager")
    assert hsa.config.vision_config._attn_implementation == stock.config.vision_config._attn_implementation
    assert hsa.config.text_config._attn_implementation == "hsa_eager"
    batch = SemanticCollator.from_tokenizer(st)([st.encode(conversation([SCENE, NOISE]))])
    seen = {}
    for name, model in (("stock", stock), ("hsa", hsa)):

        def keep(module, args, out, name=name):
            seen[name] = (out.last_hidden_state, out.pooler_output.clone())

        vision_tower(model).register_forward_hook(keep)
        with torch.no_grad():
            model(**model_inputs(model, batch, hsa=name == "hsa"))
    assert torch.equal(seen["stock"][0], seen["hsa"][0]) and torch.equal(seen["stock"][1], seen["hsa"][1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_lambda_zero_equals_the_stock_model_with_images(vl_tokenizer, st, backend, family):
    stock = vl_model(vl_tokenizer, family=family)
    stock.set_attn_implementation({"text_config": backend})
    hsa = enable_hsa(copy.deepcopy(stock), {"KEY_EVENT": 0.0, "PROCESS_NOISE": 0.0}, backend)
    feats = [st.encode(conversation(images)) for images in ([SCENE], [NOISE, SCENE, NOISE])]
    batch = SemanticCollator.from_tokenizer(st)(feats)  # right-padded, two images counts
    with torch.no_grad():
        ref = stock(**model_inputs(stock, batch, hsa=False)).logits
        out = hsa(**model_inputs(hsa, batch)).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_are_the_same_alone_padded_and_packed_with_images(vl_tokenizer, st, family):
    """λ ≠ 0: a sample's logits alone equal its rows in a right-padded batch and in a packed row (each document's
    rope positions computed alone by the model's get_rope_index)."""
    model = enable_hsa(vl_model(vl_tokenizer, family=family), {"KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}, "eager")
    feats = [st.encode(conversation(images)) for images in ([SCENE], [NOISE, SCENE, NOISE], [SCENE, SCENE])]
    feats.append(st.encode([{"role": "user", "content": "no image"}, {"role": "assistant", "content": "fine"}]))
    collate = SemanticCollator.from_tokenizer(st)
    with torch.no_grad():
        alone = [model(**model_inputs(model, collate([f]))).logits[0] for f in feats]
        padded = model(**model_inputs(model, collate(feats))).logits
        packed = model(**model_inputs(model, PackedCollator.from_tokenizer(st, 2048)([feats[:2], feats[2:]]))).logits
    for k, ref in enumerate(alone):
        torch.testing.assert_close(padded[k, : len(ref)], ref, atol=2e-5, rtol=1e-4)
    offsets = [(0, 0), (0, len(feats[0]["input_ids"])), (1, 0), (1, len(feats[2]["input_ids"]))]
    for (row, at), ref in zip(offsets, alone):
        torch.testing.assert_close(packed[row, at : at + len(ref)], ref, atol=2e-5, rtol=1e-4)


def test_images_change_the_language_model_output(vl_tokenizer, st):
    """The pixels reach the language model: another picture in the same place changes the logits after it."""
    model = enable_hsa(vl_model(vl_tokenizer), backend="sdpa")
    collate = SemanticCollator.from_tokenizer(st)
    a, b = (collate([st.encode(conversation([img]))]) for img in (SCENE, str(IMAGES / "scene_blue_top_left.png")))
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        la, lb = (model(**model_inputs(model, x)).logits for x in (a, b))
    assert (la - lb).abs().max() > 1e-3


def test_stored_samples_round_trip_images(st, tmp_path):
    """Pixels and grids go through the Arrow store unchanged (the data cache keeps images with the text)."""
    import numpy as np

    from hsa_train.data.store import EncodedSet, Sample, Writer

    enc = st.encode_detailed(conversation([SCENE, NOISE]))
    feats = {k: np.asarray(v) for k, v in enc.features.items()}
    writer = Writer(tmp_path / "s.arrow")
    writer.add(Sample(feats, enc.answer, "x:1"), 0)
    writer.add(Sample({k: feats[k] for k in ("input_ids", "labels", "semantic_ids")}, None, "x:2"), 1)
    writer.close()
    back = EncodedSet([tmp_path / "s.arrow"])
    np.testing.assert_array_equal(back[0].features["pixel_values"], feats["pixel_values"])
    np.testing.assert_array_equal(back[0].features["image_grid_thw"], feats["image_grid_thw"])
    assert "pixel_values" not in back[1].features


def test_vl_model_saves_and_loads_with_its_processor(vl_tokenizer, st, tmp_path):
    """The name_or_path route: a save_pretrained folder of the tiny model (weights, tokenizer, image processor)
    loads back as the same model and processor."""
    from hsa_train.data.vision import semantic_tokenizer
    from hsa_train.model.export import save_pretrained
    from hsa_train.model.loading import Processing, folder_source, load_image_processor, load_processing

    model = vl_model(vl_tokenizer)
    save_pretrained(model, Processing(vl_tokenizer, st.images.image_processor), tmp_path / "m")
    cfg = folder_source(tmp_path / "m")
    loaded = build_model(str(tmp_path / "m"), None, vl_tokenizer)
    assert type(loaded).__name__ == type(model).__name__
    assert load_image_processor(cfg).to_dict() == st.images.image_processor.to_dict()
    st2 = semantic_tokenizer(load_processing(cfg), st.types)
    f1, f2 = (s.encode(conversation([SCENE])) for s in (st, st2))
    assert f1["input_ids"] == f2["input_ids"]
    batch = SemanticCollator.from_tokenizer(st)([f1])
    with torch.no_grad():
        ref = model(**model_inputs(model, batch, hsa=False)).logits
        out = loaded.eval()(**model_inputs(loaded, batch, hsa=False)).logits
    torch.testing.assert_close(out, ref)


def test_mllm_demo_records_encode_with_their_images(st, peer_data):
    from hsa_train.data.loader import iter_records
    from hsa_train.data.spec import resolve_datasets

    (spec,) = resolve_datasets(["mllm_demo"], dataset_info=str(peer_data / "dataset_info.json"), types=st.types)
    rows = json.loads((peer_data / "mllm_demo.json").read_text())
    for record, row in zip(iter_records(spec, st.types), rows):
        feats = st.encode(record.messages)
        assert len(feats["image_grid_thw"]) == len(row["images"])
    # LLaMA-Factory's pictures are 300 pixels wide: the shipped processor resizes them to its 112x112 budget
    grid = st.images.one(str(peer_data / "mllm_demo_data/1.jpg"))[1][0]
    assert int(grid[1] * grid[2]) * 14 * 14 <= 112 * 112
    assert Image.open(peer_data / "mllm_demo_data/1.jpg").size[0] == 300


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_images_and_a_kv_cache_equals_full_recompute(vl_tokenizer, st, family):
    """Greedy decoding through generate (KV cache, rope deltas, the bias) equals argmax over full forwards of
    the growing sequence with its images; a left-padded batch of two prompts equals each alone."""
    from hsa_train.model.generation import generate_batch

    model = enable_hsa(vl_model(vl_tokenizer, 1, family), {"KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}, "eager")
    gen_type = st.types.default_id  # hsa.generated_type unset: generated tokens take the default type
    prompts = []
    for images in ([SCENE, NOISE], [NOISE]):
        enc = st.encode_detailed(conversation(images))
        start = enc.answer[0]
        prompt = {k: enc.features[k][:start] for k in ("input_ids", "semantic_ids")}
        prompt |= {k: torch.as_tensor(enc.features[k]) for k in ("pixel_values", "image_grid_thw")}
        prompts.append(prompt)
    steps = 6
    pad, pad_type = vl_tokenizer.pad_token_id, st.types.default_id
    batched = generate_batch(model, prompts, pad, pad_type, max_new_tokens=steps, do_sample=False)
    for prompt, got in zip(prompts, batched):
        alone = generate_batch(model, [prompt], pad, pad_type, max_new_tokens=steps, do_sample=False)[0]
        ids, sem = list(prompt["input_ids"]), list(prompt["semantic_ids"])
        with torch.no_grad():
            for _ in range(steps):
                batch = {
                    "input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    "semantic_ids": torch.tensor([sem]),
                    "pixel_values": prompt["pixel_values"],
                    "image_grid_thw": prompt["image_grid_thw"],
                }
                ids.append(int(model(**model_inputs(model, batch)).logits[0, -1].argmax()))
                sem.append(gen_type)
        assert alone == got == ids[len(prompt["input_ids"]) :]


def test_diagnose_counts_image_tokens_in_their_message_type(vl_tokenizer, st):
    """attention_by_type on samples with images: the context share of KEY_EVENT is its tokens' share, image
    tokens of the KEY_EVENT frame included (counted by hand from the vision token ids), and the pixels reach
    the measured attention."""
    import numpy as np

    from hsa_train.data.store import Sample
    from hsa_train.diagnose import attention_by_type

    model = enable_hsa(vl_model(vl_tokenizer), backend="eager")
    enc = st.encode_detailed(conversation([SCENE, NOISE]))
    feats = {k: np.asarray(v) for k, v in enc.features.items()}
    sample = Sample(feats, enc.answer, "x:1")
    result = attention_by_type(model, [sample], len(st.types.names), queries="all")
    ids = feats["input_ids"]
    vocab = vl_tokenizer.get_vocab()
    start = list(ids).index(vocab["<|vision_start|>"])  # the KEY_EVENT frame: wrapper + 9 image tokens
    key_tokens = (feats["semantic_ids"] == st.types.id_of("KEY_EVENT")).astype(float)
    assert key_tokens[start : start + 11].all()  # <|vision_start|>, 9 image tokens, <|vision_end|>
    visible = np.cumsum(key_tokens) / np.arange(1, len(ids) + 1)
    assert float(result["keys"][st.types.id_of("KEY_EVENT")]) == pytest.approx(visible.mean())
    torch.testing.assert_close(result["with_bias"].sum(1), torch.ones(2, dtype=torch.float64))
    other = Sample({**feats, "pixel_values": feats["pixel_values"][::-1].copy()}, enc.answer, "x:1")
    assert not torch.allclose(attention_by_type(model, [other], 3, queries="all")["with_bias"], result["with_bias"])


def test_cached_samples_are_rebuilt_when_an_image_changes(st, tmp_path):
    """The data cache keeps pixels with the tokens; an image rewritten under an unchanged dataset file is noticed
    (its size / time) and the entry rebuilt, rather than training on the old pixels."""
    import os
    import shutil

    from hsa_train.data.prepare import Preprocess, prepare
    from hsa_train.data.spec import DatasetSpec

    image = tmp_path / "frame.png"
    shutil.copy(SCENE, image)
    msgs = conversation([str(image)])
    data = tmp_path / "d.jsonl"
    record = {"messages": [{k: v for k, v in m.items() if k != "images"} for m in msgs], "images": [str(image)]}
    data.write_text(json.dumps(record) + "\n")
    spec, root = DatasetSpec(path=str(data)), tmp_path / "cache"
    first = prepare(spec, st, Preprocess(), root)
    again = prepare(spec, st, Preprocess(), root)
    assert not first.cached and again.cached
    Image.open(IMAGES / "scene_blue_top_left.png").save(image)
    os.utime(image, ns=(1, 1))  # even with an old timestamp: the size or time differs from what was read
    rebuilt = prepare(spec, st, Preprocess(), root)
    assert not rebuilt.cached
    assert not (rebuilt.samples[0].features["pixel_values"] == first.samples[0].features["pixel_values"]).all()


# Qwen2-VL's own chat template: a default system prompt, content parts rendered (an image part as the vision
# wrapper around one <|image_pad|>), strings as they are.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' "
    "in content %}{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_vision_wrapper_comes_from_a_template_that_renders_image_parts(vl_tokenizer, st):
    """With Qwen2-VL's template the wrapper is read from what it renders for an image part; the encoding equals
    the fallback's (the shipped template cannot render parts) on the same conversation, default system prompt
    aside, and the default system prompt takes the first message's type."""
    from hsa_train.data.vision import vision_wrapper

    tok = copy.deepcopy(vl_tokenizer)
    tok.chat_template = QWEN2_VL_TEMPLATE
    assert vision_wrapper(tok, "<|image_pad|>") == ("<|vision_start|>", "<|vision_end|>")
    tok.add_tokens(["<|wrap|>"], special_tokens=True)
    tok.chat_template = QWEN2_VL_TEMPLATE.replace("<|vision_start|>", "<|wrap|>")
    assert vision_wrapper(tok, "<|image_pad|>") == ("<|wrap|>", "<|vision_end|>")
    tok.chat_template = QWEN2_VL_TEMPLATE
    qwen = VisionSemanticTokenizer(tok, st.images.image_processor)
    msgs = conversation([SCENE, NOISE])
    ours, theirs = st.encode(msgs), qwen.encode(msgs)
    system = len(tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")["input_ids"])
    assert theirs["input_ids"][system:] == ours["input_ids"] and theirs["labels"][system:] == ours["labels"]
    assert theirs["semantic_ids"][system:] == ours["semantic_ids"]
    assert set(theirs["semantic_ids"][:system]) == {st.types.id_of("GLOBAL_CONDITION")}


def test_flex_backend_equals_eager_with_images(vl_tokenizer, st, monkeypatch):
    """The flex path (block mask from the text positions, per-key slopes) on a padded and a packed batch with
    images gives eager's logits (flex's unfused path: CPU compile time stays out of the suite)."""
    from hsa_train.model import flex

    monkeypatch.setattr(flex, "use_compiled", lambda device, needs_grad: False)
    eager = enable_hsa(vl_model(vl_tokenizer), {"KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}, "eager")
    flexed = enable_hsa(copy.deepcopy(eager), backend="flex")
    feats = [st.encode(conversation(images)) for images in ([SCENE], [NOISE, SCENE])]
    batches = [SemanticCollator.from_tokenizer(st)(feats), PackedCollator.from_tokenizer(st, 1024)([feats])]
    with torch.no_grad():
        for batch in batches:
            ref = eager(**model_inputs(eager, batch)).logits
            out = flexed(**model_inputs(flexed, batch)).logits
            keep = batch["attention_mask"].bool()
            torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=1e-4)


def test_ranks_decoding_in_step_all_run_the_vision_tower(vl_tokenizer, st, monkeypatch):
    """eval.generate under FSDP (synced): a rank whose prompts hold no image decodes the collator's blank image row
    beside them (unscored), so its first step gathers the vision blocks as the other ranks' does."""
    from hsa_train.data.dataset import eval_batches
    from hsa_train.data.store import Sample
    from hsa_train.training import evaluate

    collate = SemanticCollator.from_tokenizer(st, in_step=True)
    text = st.encode_detailed([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    (batch,) = eval_batches([Sample(text.features, text.answer, "x:1")], 4, collate)
    assert len(batch["input_ids"]) == 2 and batch["answer_span"][1].tolist() == [-1, -1]  # the filler row
    filler_length = len(collate.image_filler["input_ids"])
    assert int(batch["filler_tokens"]) == filler_length == int(batch["attention_mask"][1].sum())  # not data
    packed = PackedCollator.from_tokenizer(st, 256, in_step=True)
    assert int(packed([[text.features]])["filler_tokens"]) == filler_length
    image = st.encode(conversation([SCENE]))
    assert "filler_tokens" not in collate([image]) and "filler_tokens" not in packed([[image]])  # no filler needed
    seen = []
    monkeypatch.setattr(evaluate, "generate_batch", lambda model, prompts, *a, **k: seen.append(prompts) or [[]])
    model = enable_hsa(vl_model(vl_tokenizer), backend="eager")
    for synced in (False, True):
        evaluate.generated_answer_sums(model, [batch], collate, torch.device("cpu"), synced=synced)
    alone, in_step = seen
    assert len(alone) == 1 and "image_grid_thw" not in alone[0]
    assert len(in_step) == 2 and torch.equal(
        in_step[1]["image_grid_thw"], torch.as_tensor(collate.image_filler["image_grid_thw"])
    )


def test_the_processed_image_cache_is_bounded_in_bytes(st, monkeypatch):
    """Processed pictures are kept per process up to a byte budget (real Qwen2-VL images are megabytes each),
    least recently used out first, and a cached picture is the same as a fresh one."""
    from hsa_train.data import vision

    images = vision.ImageProcessing(st.images.image_processor)
    one = images.one(SCENE)[0].nbytes
    monkeypatch.setattr(vision, "IMAGE_CACHE_BYTES", 2 * one)
    images = vision.ImageProcessing(st.images.image_processor)
    fresh = images.one(SCENE)[0].copy()
    for name in ("scene_blue_top_left.png", "scene_green_top_left.png", "scene_red_top_right.png"):
        images.one(str(IMAGES / name))
        assert images._bytes <= 2 * one and images._bytes == sum(p.nbytes for p, _ in images._cache.values())
    assert len(images._cache) == 2 and vision.image_key(SCENE) not in images._cache
    assert (images.one(SCENE)[0] == fresh).all()
