"""Tiny random configs of the decoder families the README names, for the architecture matrix.

Each is the family's own config class with small sizes (hidden 32, 4 query heads, 2 layers, vocabulary 64) and the
features that matter to HSA switched on: a sliding window of 4 tokens (Mistral, Qwen2 with use_sliding_window,
Gemma 2 / 3), logit soft-capping (Gemma 2), grouped-query attention, mixtures of experts, 3-D rope (Qwen2-VL).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

VOCAB = 64
WINDOW = 4
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128,
)  # fmt: skip

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", **LLAMA_LIKE),
    "qwen2": dict(model_type="qwen2", **LLAMA_LIKE),
    "qwen2_window": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **LLAMA_LIKE
    ),
    "qwen3": dict(model_type="qwen3", head_dim=8, **LLAMA_LIKE),
    "mistral": dict(model_type="mistral", sliding_window=WINDOW, **LLAMA_LIKE),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=8,
        sliding_window=WINDOW,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=8,
        **LLAMA_LIKE,
    ),  # fmt: skip
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=8,
        sliding_window=WINDOW,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"],
        **LLAMA_LIKE,
    ),  # fmt: skip
    "phi3": dict(model_type="phi3", **LLAMA_LIKE),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rotary_pct=0.5,
    ),  # fmt: skip
    "gpt2": dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=2, n_positions=128),
    "olmo2": dict(model_type="olmo2", **LLAMA_LIKE),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        **LLAMA_LIKE,
    ),  # fmt: skip
    "qwen2_vl": dict(
        model_type="qwen2_vl",
        text_config=dict(**LLAMA_LIKE, **COMMON, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, in_chans=3),
    ),
}

# Families with a sliding window (decoding must go past it) and with soft-capped logits (sdpa cannot serve).
SLIDING = {"qwen2_window", "mistral", "gemma2", "gemma3_text"}
SOFTCAP = {"gemma2"}


def tiny(family: str, seed: int = 0, attn: str = "eager"):
    """A stock model of `family`, randomly initialised (seeded), in eval mode."""
    fields = dict(FAMILIES[family])
    model_type = fields.pop("model_type")
    if model_type != "qwen2_vl":
        fields = {**COMMON, **fields}
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model_type == "qwen2_vl" else AutoModelForCausalLM  # text-only inputs here
    return auto.from_config(config, attn_implementation=attn).eval()
