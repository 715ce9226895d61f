"""Model folders in Hugging Face formats, written and loaded back with HSA on.

- full fine-tuning: a model folder (safetensors + tokenizer, HSA settings in config.json);
- LoRA: an adapter folder (PEFT format + tokenizer + `hsa_config.json`), or a model folder of the base with the
  adapter merged in.
HSA's λ live in the config only: the `hsa.*` tensors (learnable λ) stay out of the weights, so a folder loads into
the stock architecture without unexpected keys. Writing a run's folders from every rank is `training/export.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hsa_train.model.hsa import enable_hsa, sync_hsa_config
from hsa_train.model.loading import load_pretrained
from hsa_train.model.lora import quiet_peft

HSA_CONFIG = "hsa_config.json"


def without_hsa_tensors(state: dict) -> dict:
    """The state dict minus HSA's λ tensors, which live in the config."""
    return {k: v for k, v in state.items() if ".hsa." not in f".{k}"}


def raw_lambdas(state: dict):
    """HSA's learnable λ tensor in a state dict, or None."""
    return next((v for k, v in state.items() if k.endswith("hsa.raw")), None)


def save_pretrained(model: nn.Module, processing, path: str | Path, state: dict | None = None) -> None:
    """`save_pretrained` of the model and its processing (a tokenizer, or `loading.Processing`), λ in the config.
    `state` is the full state dict when the caller gathered it (FSDP); else the model's own."""
    state = state if state is not None else model.state_dict()
    sync_hsa_config(model, raw_lambdas(state))
    model.save_pretrained(str(path), state_dict=without_hsa_tensors(state))
    processing.save_pretrained(str(path))


def save_adapter(peft_model: nn.Module, processing, path: str | Path, state: dict) -> None:
    """PEFT's adapter folder, plus the processing and the HSA settings the base model needs to match training.
    `state`: the peft model's full state dict."""
    path = Path(path)
    base = peft_model.get_base_model()
    sync_hsa_config(base, raw_lambdas(state))
    peft_model.save_pretrained(str(path), state_dict=without_hsa_tensors(state))
    processing.save_pretrained(str(path))
    if getattr(base.config, "hsa", None):
        (path / HSA_CONFIG).write_text(json.dumps(base.config.hsa, indent=2))


def load_exported(path: str | Path, merge: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A model folder or a LoRA adapter folder written by hsa_train, loaded with HSA enabled as it was trained.
    For an adapter the base comes from its `base_model_name_or_path`; `merge=True` folds the adapter in."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel  # peft is only imported where an adapter is loaded

        base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_pretrained(base_path, dtype=dtype)
        settings = json.loads((path / HSA_CONFIG).read_text()) if (path / HSA_CONFIG).is_file() else None
        if settings:
            base.config.hsa = settings
            enable_hsa(base)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(path))
        if merge:
            model = model.merge_and_unload()
            if settings:
                model.config.hsa = settings
        return model.eval()
    model = load_pretrained(str(path), dtype=dtype)
    if getattr(model.config, "hsa", None):
        enable_hsa(model)
    return model.eval()
