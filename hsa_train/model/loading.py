"""Builds the model and tokenizer a run asks for: a real checkpoint (hub id or local folder), or a small model
initialised from an architecture description with the tokenizer shipped in the package. No per-model code: any
architecture transformers' Auto classes know goes through the same path."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_tokenizer_dir() -> Path:
    return Path(str(resources.files("hsa_train.assets") / "tokenizer"))


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer at `name_or_path`, or the shipped one; given a pad token if it has none.

    `chat_template` replaces the tokenizer's template: "chatml" (the shipped ChatML template), or a path to a Jinja
    file. Base models often have none, and training needs one to know where messages begin and end."""
    source = name_or_path or str(bundled_tokenizer_dir())
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if chat_template == "chatml":
        tokenizer.chat_template = (bundled_tokenizer_dir() / "chat_template.jinja").read_text(encoding="utf-8")
    elif chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"model.chat_template={chat_template}: no such file; use 'chatml' or a .jinja path")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {source} has neither a pad nor an eos token; give it a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    name_or_path: str | None,
    arch: Mapping[str, Any] | None,
    tokenizer,
    dtype: str = "float32",
    trust_remote_code: bool = False,
):
    """From a checkpoint when `name_or_path` is set, else a fresh model of `arch` (a transformers config: `type`
    names the architecture, the rest are its config fields), sized to the tokenizer's vocabulary."""
    torch_dtype = DTYPES[dtype]
    if name_or_path:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    if not arch or "type" not in arch:
        raise ValueError("model.arch.type is required when model.name_or_path is null (e.g. qwen2)")
    fields = {k: v for k, v in arch.items() if k != "type"}
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.arch.vocab_size={fields['vocab_size']} < tokenizer size {len(tokenizer)}")
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        config = AutoConfig.for_model(arch["type"], **fields)
    except ValueError as exc:
        raise ValueError(f"model.arch.type={arch['type']!r}: {exc}") from None
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


def without_hsa_tensors(state: dict) -> dict:
    """The state dict minus HSA's λ tensors, which live in the config."""
    return {k: v for k, v in state.items() if ".hsa." not in f".{k}"}


def raw_lambdas(state: dict):
    """HSA's learnable λ tensor in a state dict, or None."""
    return next((v for k, v in state.items() if k.endswith("hsa.raw")), None)


def save_pretrained(model, tokenizer, path: str | Path, state: dict | None = None) -> None:
    """`save_pretrained` of model and tokenizer, with HSA's λ in the config only: the `hsa.*` tensors (learnable
    λ) stay out of the weights, so the folder loads into the stock architecture without unexpected keys.
    `state` is the full state dict when the caller gathered it (FSDP); else the model's own."""
    from hsa_train.model.hsa import sync_hsa_config

    state = state if state is not None else model.state_dict()
    sync_hsa_config(model, raw_lambdas(state))
    model.save_pretrained(str(path), state_dict=without_hsa_tensors(state))
    tokenizer.save_pretrained(str(path))


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen LoRA bases need no input grads).
    transformers 5 renamed the switch; older 5.x releases only have the first name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
