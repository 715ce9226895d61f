"""The end products of a run, in Hugging Face formats, and loading them back with HSA on.

- full fine-tuning: `<run>/model/` (safetensors + tokenizer, HSA settings in config.json);
- LoRA: `<run>/adapter/` (PEFT format + tokenizer + `hsa_config.json`) and, with `export.merge=true`,
  `<run>/model/`, the base with the adapter merged in.
Under FSDP every rank takes part in gathering the full weights; rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hsa_train.model.hsa import enable_hsa, sync_hsa_config
from hsa_train.model.loading import load_pretrained, raw_lambdas, save_pretrained, without_hsa_tensors
from hsa_train.model.lora import quiet_peft
from hsa_train.training import distributed as D

HSA_CONFIG = "hsa_config.json"


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP and / or peft wrappers."""
    model = D.unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def export_model(model: nn.Module, tokenizer, out_dir: Path, info: D.DistInfo, lora: bool, merge: bool) -> dict:
    """Writes the run's model (see module doc); returns the folders written, for metrics.json."""
    state = _full_state_dict(D.unwrap(model))  # collective under FSDP
    written: dict[str, str] = {}
    if info.is_main and not lora:
        save_pretrained(_hf_model(model), tokenizer, out_dir, state)
        written["model_dir"] = str(out_dir)
    elif info.is_main:
        adapter_dir = out_dir.parent / "adapter"
        _write_adapter(model, tokenizer, adapter_dir, state)
        written["adapter_dir"] = str(adapter_dir)
        if merge:
            save_pretrained(load_exported(adapter_dir, merge=True), tokenizer, out_dir)
            written["model_dir"] = str(out_dir)
    D.barrier(info)
    return written


def _write_adapter(model: nn.Module, tokenizer, adapter_dir: Path, state: dict) -> None:
    """PEFT's adapter folder, plus the tokenizer and the HSA settings the base model needs to match training."""
    hf = _hf_model(model)
    sync_hsa_config(hf, raw_lambdas(state))
    D.unwrap(model).save_pretrained(str(adapter_dir), state_dict=without_hsa_tensors(state))
    tokenizer.save_pretrained(str(adapter_dir))
    if getattr(hf.config, "hsa", None):
        (adapter_dir / HSA_CONFIG).write_text(json.dumps(hf.config.hsa, indent=2))


def load_exported(path: str | Path, merge: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A model folder or a LoRA adapter folder written by hsa_train, loaded with HSA enabled as it was trained.
    For an adapter the base comes from its `base_model_name_or_path`; `merge=True` folds the adapter in."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

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
