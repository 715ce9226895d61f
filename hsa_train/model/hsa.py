"""`enable_hsa`: turns any transformers model that uses the attention registry into an HSA model (SPEC §3).

No model code is edited. The model's attention implementation is switched to a registered HSA one (attention and
mask functions under the same name), a small `hsa` submodule holds λ (a buffer, or a parameter when learnable),
and a forward pre-hook turns `semantic_ids=` into the per-forward context the attention functions read. The
settings live in `model.config.hsa`, so `save_pretrained` / `from_pretrained` + `enable_hsa()` round-trips them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from hsa_train.model.attention import BACKENDS, register
from hsa_train.model.bias import HEAD_SCALINGS
from hsa_train.model.context import HSAForwardContext
from hsa_train.types import DEFAULT_LAMBDAS, DEFAULT_TYPE, DEFAULT_TYPES, SemanticTypes


@dataclass
class HSASettings:
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    default_type: str = DEFAULT_TYPE
    lambdas: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LAMBDAS))
    head_scaling: str = "none"
    backend: str = "sdpa"
    learnable: bool = False

    def __post_init__(self) -> None:
        self.types = list(self.types)
        self.lambdas = {str(k): float(v) if isinstance(v, (int, float)) else v for k, v in dict(self.lambdas).items()}
        self.semantic_types.lambda_vector(self.lambdas)  # validates names and values
        if self.head_scaling not in HEAD_SCALINGS:
            raise ValueError(f"hsa.head_scaling={self.head_scaling!r}: use one of {', '.join(HEAD_SCALINGS)}")
        if self.backend not in BACKENDS + ("auto",):
            raise ValueError(f"hsa.backend={self.backend!r}: use one of {', '.join(BACKENDS + ('auto',))}")

    @property
    def semantic_types(self) -> SemanticTypes:
        return SemanticTypes.from_names(self.types, self.default_type)

    @property
    def resolved_backend(self) -> str:
        return "sdpa" if self.backend == "auto" else self.backend

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HSALambdas(nn.Module):
    """λ per type, in type-id order. A non-persistent buffer when fixed (the config holds the values), a parameter
    when learnable (kept non-negative by clamping in `values()`)."""

    def __init__(self, values: list[float], learnable: bool):
        super().__init__()
        tensor = torch.tensor(values, dtype=torch.float32)
        self.learnable = learnable
        if learnable:
            self.raw = nn.Parameter(tensor)
        else:
            self.register_buffer("raw", tensor, persistent=False)

    def values(self) -> torch.Tensor:
        return self.raw.clamp_min(0.0) if self.learnable else self.raw

    def extra_repr(self) -> str:
        return f"lambdas={[round(v, 6) for v in self.values().tolist()]}, learnable={self.learnable}"


def _hsa_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    semantic_ids = kwargs.pop("semantic_ids", None)
    if "hsa_context" in kwargs:
        return args, kwargs
    if semantic_ids is None:
        raise ValueError(
            "this model has HSA enabled and needs semantic_ids=... (one type id per token, from SemanticTokenizer "
            "/ SemanticCollator) in its forward call"
        )
    ref = kwargs.get("input_ids")
    if ref is None and args:
        ref = args[0]
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    semantic_ids = torch.as_tensor(semantic_ids)
    if semantic_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"semantic_ids must be integer type ids, got dtype {semantic_ids.dtype}")
    if semantic_ids.ndim != 2 or (
        ref is not None and (semantic_ids.shape[0] != ref.shape[0] or semantic_ids.shape[1] < ref.shape[1])
    ):
        shape = tuple(ref.shape[:2]) if ref is not None else "?"
        raise ValueError(f"semantic_ids has shape {tuple(semantic_ids.shape)}; expected (batch, seq_len) = {shape}")
    hsa: HSALambdas = model.hsa
    n_types = hsa.raw.numel()
    if semantic_ids.numel() and (int(semantic_ids.min()) < 0 or int(semantic_ids.max()) >= n_types):
        raise ValueError(
            f"semantic_ids holds ids outside [0, {n_types}): the model knows {n_types} types "
            f"({', '.join(model.config.hsa['types'])})"
        )
    kwargs["hsa_context"] = HSAForwardContext(
        semantic_ids.long(), hsa.values(), model.config.hsa["head_scaling"], kwargs.get("position_ids")
    )
    return args, kwargs


def hsa_settings(model: nn.Module) -> HSASettings | None:
    """The HSA settings stored in the model's config, or None."""
    stored = getattr(model.config, "hsa", None)
    return HSASettings(**stored) if stored else None


def model_types(model: nn.Module) -> SemanticTypes:
    """The semantic types an HSA model decays by (its `model.config.hsa`): the one source of truth that the
    tokenizer and collator feeding it take theirs from (`SemanticTokenizer.from_model`)."""
    settings = hsa_settings(model)
    if settings is None:
        raise ValueError("the model has no HSA settings (model.config.hsa): enable_hsa(model, ...) first")
    return settings.semantic_types


def check_types(model: nn.Module, types: SemanticTypes, theirs: str = "the tokenizer") -> None:
    """Raises when `types` (a tokenizer's, a collator's) differ from the model's: the same id would mean
    another type, and the wrong tokens would fade without a word."""
    model_types(model).require_same(types, "the model", theirs)


def enable_hsa(
    model: nn.Module,
    lambdas: Mapping[str, float] | None = None,
    backend: str | None = None,
    *,
    types: list[str] | None = None,
    default_type: str | None = None,
    head_scaling: str | None = None,
    learnable: bool | None = None,
) -> nn.Module:
    """Enables HSA on `model` in place and returns it. Arguments left as None keep what `model.config.hsa` holds
    (after `from_pretrained` of an HSA model), else the SPEC defaults. `lambdas` may name only the types it changes."""
    base = hsa_settings(model) or HSASettings()
    new_types = list(types) if types is not None else base.types
    merged = {k: v for k, v in base.lambdas.items() if k in new_types}
    merged.update(dict(lambdas or {}))
    settings = replace(
        base,
        types=new_types,
        default_type=default_type if default_type is not None else base.default_type,
        lambdas=merged,
        head_scaling=head_scaling if head_scaling is not None else base.head_scaling,
        backend=backend if backend is not None else base.backend,
        learnable=learnable if learnable is not None else base.learnable,
    )
    name = register(settings.resolved_backend)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"{type(model).__name__} did not accept attn_implementation={name!r}: its attention does not go "
            "through transformers' AttentionInterface, so HSA cannot reach it"
        )
    model.config.hsa = settings.to_dict()
    vector = settings.semantic_types.lambda_vector(settings.lambdas)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.hsa = HSALambdas(vector, settings.learnable).to(device)
    if getattr(model, "_hsa_hook", None) is None:
        model._hsa_hook = model.register_forward_pre_hook(_hsa_pre_hook, with_kwargs=True)
    return model


def sync_hsa_config(model: nn.Module, values: torch.Tensor | None = None) -> None:
    """Writes learned λ back into `model.config.hsa` before saving (fixed λ are already there, exactly).
    `values` are the raw λ when the caller holds them gathered (FSDP); else they are read from the model."""
    hsa = getattr(model, "hsa", None)
    if not (getattr(model.config, "hsa", None) and isinstance(hsa, HSALambdas) and hsa.learnable):
        return
    raw = values if values is not None else hsa.raw
    learned = raw.detach().clamp_min(0.0).cpu().tolist()
    model.config.hsa = {**model.config.hsa, "lambdas": dict(zip(model.config.hsa["types"], learned))}
