"""The private transformers names hsa_train relies on (hsa_train/model/compat.py), checked against the installed
transformers: each test fails with the name to update when a release renames or reshapes one."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache

from hsa_train.model import compat
from hsa_train.model.hsa import enable_hsa

PACKAGE = Path(__file__).resolve().parent.parent / "hsa_train"
PRIVATE = (
    "_validate_model_kwargs",
    "_update_model_kwargs_for_generation",
    "_valid_auto_compile_criteria",
    "_compile_jinja_template",
    "_attn_implementation",
    "_no_split_modules",
    "_tokenizer",
    "encode_special_tokens",
)


def _changed(name: str, what: str) -> str:
    return f"transformers {transformers.__version__}: {name} {what}; update hsa_train/model/compat.py"


@pytest.mark.parametrize(
    "name, params",
    [
        ("_validate_model_kwargs", ["self", "model_kwargs"]),
        (
            "_update_model_kwargs_for_generation",
            ["self", "outputs", "model_kwargs", "is_encoder_decoder", "num_new_tokens"],
        ),
        ("_valid_auto_compile_criteria", ["self", "model_kwargs", "generation_config"]),
    ],
)
def test_the_generation_steps_compat_overrides_exist_with_their_arguments(name, params):
    assert name in compat.GENERATION_STEPS
    step = getattr(GenerationMixin, name, None)
    assert step is not None, _changed(f"GenerationMixin.{name}", "is gone")
    got = list(inspect.signature(step).parameters)
    assert got == params, _changed(f"GenerationMixin.{name}", f"takes {got}, compat overrides it as {params}")
    assert name in vars(compat.GenerationHooks)


def test_generate_keeps_the_inputs_the_validation_step_removes(tokenizer):
    """compat.GenerationHooks removes semantic_ids in the validation step, which must get a copy of the inputs:
    the steps after it still see semantic_ids (one more per generated token)."""
    model = enable_hsa(tiny_model(vocab_size=len(tokenizer)), backend="eager").eval()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("hsa_context").semantic_ids.shape[-1])
        return forward(*args, **kwargs)

    model.forward = spy
    ids = torch.tensor([[3, 4, 5]])
    out = model.generate(ids, semantic_ids=torch.zeros_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[-1] == 6
    assert seen == [3, 4, 5], _changed("generate()", "no longer hands _validate_model_kwargs a copy of its inputs")


def test_the_compiled_chat_template_renders_as_apply_chat_template(tokenizer):
    template = compat.compile_chat_template(tokenizer.chat_template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = template.render(messages=messages, add_generation_prompt=False, **tokenizer.special_tokens_map)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False), _changed(
        "chat_template_utils._compile_jinja_template", "renders differently"
    )


def test_attention_implementation_and_decoder_layers_are_read_from_the_model():
    model = tiny_model()
    model.set_attn_implementation("eager")
    assert compat.attn_implementation(model.config) == "eager", _changed(
        "PretrainedConfig._attn_implementation", "moved"
    )
    assert compat.no_split_modules(model) == {"Qwen2DecoderLayer"}, _changed(
        "PreTrainedModel._no_split_modules", "moved"
    )


def test_the_backend_encodes_special_token_text_as_plain_text_only_when_asked(tokenizer):
    backend = compat.fast_backend(tokenizer)
    assert backend is not None, _changed("the fast tokenizer's backend_tokenizer", "is gone")
    special = "<|im_end|>"
    (as_special,) = compat.encode_batch(backend, [special], plain=False)
    (as_text,) = compat.encode_batch(backend, [special], plain=True)
    assert as_special.ids == [tokenizer.convert_tokens_to_ids(special)]
    assert len(as_text.ids) > 1 and special not in tokenizer.convert_ids_to_tokens(as_text.ids)
    assert backend.encode_special_tokens is False  # put back: the backend is shared with its tokenizer
    assert tokenizer(special, add_special_tokens=False)["input_ids"] == as_special.ids


def test_a_cache_taken_apart_and_built_again_continues_the_sequence():
    """compat.cache_tensors / cache_of: a dynamic cache's per-layer tensors, and a cache built from them (cut to a
    prefix) that a forward extends exactly as the original; a sliding-window cache is refused (None)."""
    model = tiny_model(vocab_size=50)
    name = compat.cache_argument(model)
    assert name in ("cache", "past_key_values")
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        first = compat.output_cache(model(input_ids=ids[:, :15], use_cache=True))
        tensors = compat.cache_tensors(first)
        assert tensors is not None and len(tensors) == 2, _changed("DynamicCache.layers[i].keys/values", "moved")
        assert tensors[0][0].shape[2] == 15
        rebuilt = compat.cache_of([(k[:, :, :12], v[:, :, :12]) for k, v in tensors])
        assert rebuilt.get_seq_length() == 12
        again = model(input_ids=ids[:, 12:], **{name: rebuilt}).logits[0, -1]
    torch.testing.assert_close(again, full, atol=1e-6, rtol=1e-5)
    sliding = tiny_model(vocab_size=50, model_type="mistral")
    sliding.config.sliding_window = 4
    with torch.no_grad():
        cache = compat.output_cache(
            sliding(
                input_ids=ids, use_cache=True, **{compat.cache_argument(sliding): DynamicCache(config=sliding.config)}
            )
        )
    assert compat.cache_tensors(cache) is None


def test_a_cache_with_room_decodes_as_a_dynamic_one_and_writes_in_place():
    """compat.with_room / RoomyLayer: token by token, a forward over a cache with room gives the logits a plain
    dynamic cache gives; within the room the buffers stay where they are (no copy of the cache per token); past
    it they grow; rows are selected, and a reset cache fills again."""
    model = tiny_model(vocab_size=50)
    name = compat.cache_argument(model)
    ids = torch.arange(3, 24)[None].repeat(2, 1)
    ids[1] = ids[1].flip(0)
    with torch.no_grad():
        plain = compat.output_cache(model(input_ids=ids[:, :12], use_cache=True))
        roomy = compat.with_room(compat.output_cache(model(input_ids=ids[:, :12], use_cache=True)), room=3)
        assert isinstance(roomy.layers[0], compat.RoomyLayer) and roomy.get_seq_length() == 12
        where = roomy.layers[0].buffers[0].data_ptr()
        for t in range(12, 20):  # 3 tokens in the room, then 5 past it
            expected = model(input_ids=ids[:, t : t + 1], **{name: plain}).logits[:, -1]
            got = model(input_ids=ids[:, t : t + 1], **{name: roomy}).logits[:, -1]
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
            moved = roomy.layers[0].buffers[0].data_ptr() != where
            assert moved == (t >= 15), f"token {t}: the buffer {'moved' if moved else 'stayed'}"
        assert compat.cache_tensors(roomy) is not None and roomy.get_seq_length() == 20
        roomy.batch_select_indices(torch.tensor([1]))
        plain.batch_select_indices(torch.tensor([1]))
        expected = model(input_ids=ids[1:, 20:], **{name: plain}).logits[:, -1]
        torch.testing.assert_close(model(input_ids=ids[1:, 20:], **{name: roomy}).logits[:, -1], expected)
        roomy.reset()
        assert roomy.get_seq_length() == 0
        again = model(input_ids=ids[:1, :12], **{name: roomy}).logits[:, -1]
        torch.testing.assert_close(again, model(input_ids=ids[:1, :12]).logits[:, -1], atol=1e-6, rtol=1e-5)


def test_no_module_but_compat_names_a_private_transformers_name():
    pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in PRIVATE) + r")\b")
    users = sorted(
        f"{path.relative_to(PACKAGE)}: {match.group(1)}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "compat.py"
        for match in pattern.finditer(path.read_text())
    )
    assert users == []
