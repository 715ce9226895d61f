"""The end products of a run: `<run>/model/` (full fine-tuning, or the base with the LoRA adapter merged in under
`export.merge=true`) and `<run>/adapter/` (LoRA). Under FSDP every rank takes part in gathering the full weights;
rank 0 writes (the folders themselves: `model/export.py`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from hsa_train.agent.folder import base_model
from hsa_train.data.rules import SavedRules
from hsa_train.model.export import load_exported, save_adapter, save_pretrained
from hsa_train.model.settings import HSASettings
from hsa_train.training import distributed as D


def _full_state_dict(model: nn.Module, trained_only: bool) -> dict[str, torch.Tensor]:
    """The whole state dict, gathered to CPU; `trained_only`: only the parameters that train (a LoRA run's adapters
    and λ), by name: the frozen base is not gathered, and a bitsandbytes int8 base adds state-dict entries that
    DCP's state-dict helpers cannot follow (checkpoint._states)."""
    if not trained_only:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731  (FSDP2: a collective)
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def export_model(
    model: nn.Module,
    processing,
    out_dir: Path,
    info: D.DistInfo,
    lora: bool,
    merge: bool,
    rules: SavedRules | None = None,
    plain: HSASettings | None = None,
) -> dict:
    """Writes the run's model (see module doc), each folder with the run's typing `rules`; returns the folders
    written, for metrics.json. `plain`: the settings of a run trained without the bias (hsa.enabled=false),
    written with λ = 0 for every type, so that its folder runs as it trained (no decay: plain attention) and
    types, cuts and masks a conversation by the run's types; without them it would run with the default λ."""
    inner = D.unwrap(model)  # DDP's module; a peft model under LoRA
    if plain is not None:
        base_model(inner).config.hsa = plain.changed({t: 0.0 for t in plain.types}, learnable=False).to_dict()
    state = _full_state_dict(inner, trained_only=lora)  # collective under FSDP
    written: dict[str, str] = {}
    if info.is_main and not lora:
        save_pretrained(inner, processing, out_dir, state)
        written["model_dir"] = str(out_dir)
    elif info.is_main:
        adapter_dir = out_dir.parent / "adapter"
        save_adapter(inner, processing, adapter_dir, state)
        written["adapter_dir"] = str(adapter_dir)
        if merge:
            save_pretrained(load_exported(adapter_dir, merge=True), processing, out_dir)
            written["model_dir"] = str(out_dir)
    if rules is not None:
        for folder in written.values():
            rules.save(folder)
    D.barrier(info)
    return written
