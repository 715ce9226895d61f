"""LoRA adapters through peft, on top of an HSA model (HSA first, so its λ live in the base model)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any

from torch import nn

from hsa_train.model.vision import freeze_vision, vision_tower


@contextmanager
def quiet_peft():
    """peft reads a transformers property that transformers 5 deprecates; the warning is for peft, not our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def apply_lora(model: nn.Module, settings: Any, train_lambdas: bool, skip: nn.Module | None = None) -> nn.Module:
    """`settings` has r, alpha, dropout, target_modules ("all-linear" or a list of module names). Only the
    adapters train, plus HSA's λ when they are learnable. `skip`: a sub-module that gets no adapters (a frozen
    vision tower: LoRA then adapts the language model only)."""
    from peft import LoraConfig, get_peft_model

    target = settings.target_modules
    excluded = None
    if skip is not None:
        inner = {id(m) for m in skip.modules()}
        excluded = [name for name, module in model.named_modules() if id(module) in inner]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        exclude_modules=excluded,
        task_type="CAUSAL_LM",
    )
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    if train_lambdas and isinstance(getattr(model, "hsa", None), nn.Module):
        for param in model.hsa.parameters():
            param.requires_grad_(True)
    return peft_model


def trainable_parts(model: nn.Module, model_cfg: Any, train_lambdas: bool) -> tuple[nn.Module, list[str]]:
    """What trains, as `model_cfg` asks: a vision tower frozen (`freeze_vision`; null = frozen with LoRA), a
    quantized base prepared (`quantization`), then LoRA adapters (none inside a frozen tower). Returns the model
    (peft-wrapped with LoRA) and notes for the log."""
    lora = model_cfg.lora.enabled
    frozen = model_cfg.freeze_vision if model_cfg.freeze_vision is not None else lora
    notes = []
    if frozen and freeze_vision(model):
        notes.append("note: the vision tower is frozen (model.freeze_vision); the language model trains")
    if model_cfg.quantization:  # QLoRA: the quantized base frozen, the rest (norms, head, HSA's λ) in fp32
        prepare_quantized(model)
        notes.append(f"note: the base is quantized ({model_cfg.quantization}, bitsandbytes); LoRA adapters train")
    if lora:
        model = apply_lora(model, model_cfg.lora, train_lambdas, skip=vision_tower(model) if frozen else None)
    return model, notes


def prepare_quantized(model: nn.Module) -> None:
    """peft's k-bit preparation: every parameter frozen, those not quantized cast to fp32 (layer norms, the output
    head, HSA's λ: a bf16 λ would round away small slopes and their updates). Activation checkpointing stays
    train.gradient_checkpointing's (non-reentrant: no input gradients needed)."""
    from peft import prepare_model_for_kbit_training

    with quiet_peft():
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        # bitsandbytes (0.50) repacks a 4-bit layer's weights for AVX512-BF16 CPU inference at its first forward
        # in eval mode without gradients, and never back: training forwards after it (past an evaluation, or a
        # DPO reference) then fail. A run trains and evaluates in turn, so the repacking stays off.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
