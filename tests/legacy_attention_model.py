"""A tiny causal LM whose attention is written inline, the way transformers' models were before the attention
registry: `set_attn_implementation` cannot reach it. Kept apart from the tests so that the test does not depend on
which real architectures transformers has moved into the registry (Falcon moved in 5.25)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class LegacyConfig(PretrainedConfig):
    model_type = "hsa_test_legacy"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, num_attention_heads: int = 4, **kwargs):
        self.vocab_size, self.hidden_size, self.num_attention_heads = vocab_size, hidden_size, num_attention_heads
        super().__init__(**kwargs)


class LegacyAttention(nn.Module):
    """Causal self-attention computed here, never through a registered attention function."""

    def __init__(self, config: LegacyConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, n, d)


class LegacyForCausalLM(PreTrainedModel):
    config_class = LegacyConfig

    def __init__(self, config: LegacyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = LegacyAttention(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.head(self.attn(self.embed(input_ids)))
