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
from hsa_train.model.generation import with_generation
from hsa_train.model.vision import attn_implementation_for, text_attn_implementation
from hsa_train.types import DEFAULT_LAMBDAS, DEFAULT_TYPE, DEFAULT_TYPES, SemanticTypes

LEARNABLE = (False, True, "per_head")


@dataclass
class HSASettings:
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    default_type: str = DEFAULT_TYPE
    lambdas: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LAMBDAS))
    head_scaling: str = "none"
    backend: str = "auto"
    learnable: bool | str = False
    generated_type: str | None = None
    lambdas_per_head: dict[str, list[float]] | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        self.types = list(self.types)
        self.lambdas = {str(k): float(v) if isinstance(v, (int, float)) else v for k, v in dict(self.lambdas).items()}
        self.semantic_types.lambda_vector(self.lambdas)  # validates names and values
        if self.head_scaling not in HEAD_SCALINGS:
            raise ValueError(f"hsa.head_scaling={self.head_scaling!r}: use one of {', '.join(HEAD_SCALINGS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"hsa.backend={self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.learnable not in LEARNABLE or not isinstance(self.learnable, (bool, str)):
            raise ValueError(f"hsa.learnable={self.learnable!r}: use false, true (λ per type) or per_head")
        if self.generated_type is not None and self.generated_type not in self.types:
            raise ValueError(
                f"hsa.generated_type={self.generated_type!r} is not one of hsa.types {self.types}; name one, or "
                "null for the default type"
            )
        if self.lambdas_per_head is not None:
            per_head = {str(k): [float(x) for x in v] for k, v in dict(self.lambdas_per_head).items()}
            widths = {len(v) for v in per_head.values()}
            if set(per_head) != set(self.types) or len(widths) != 1 or any(x < 0 for v in per_head.values() for x in v):
                raise ValueError("hsa.lambdas_per_head: give the same number (>= 0) of per-head λ for every type")
            self.lambdas_per_head = per_head

    @property
    def semantic_types(self) -> SemanticTypes:
        return SemanticTypes.from_names(self.types, self.default_type)

    @property
    def generated_type_id(self) -> int:
        return self.semantic_types.id_of(self.generated_type)

    def lambda_tensor(self, num_heads: int) -> torch.Tensor:
        """λ per type (T,), or per head and type (H, T) when learned per head (or being learned so)."""
        if self.lambdas_per_head is not None:
            table = torch.tensor([self.lambdas_per_head[t] for t in self.types], dtype=torch.float32).T
            if table.shape[0] != num_heads:
                raise ValueError(
                    f"the model's HSA λ were learned for {table.shape[0]} heads, the model has {num_heads} "
                    "attention heads"
                )
            return table.contiguous()
        vector = torch.tensor(self.semantic_types.lambda_vector(self.lambdas), dtype=torch.float32)
        return vector.expand(num_heads, -1).clone() if self.learnable == "per_head" else vector

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HSALambdas(nn.Module):
    """λ per type in type-id order, (T,) or per head (H, T). A non-persistent buffer when fixed (the config holds
    the values), a parameter when learnable (kept non-negative by clamping in `values()`)."""

    def __init__(self, values: torch.Tensor, learnable: bool):
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.raw = nn.Parameter(values.clone())
        else:
            self.register_buffer("raw", values.clone(), persistent=False)

    def values(self) -> torch.Tensor:
        return self.raw.clamp_min(0.0) if self.learnable else self.raw

    def extra_repr(self) -> str:
        values = self.values().detach()
        shown = [round(v, 6) for v in values.tolist()] if values.ndim == 1 else f"per head {tuple(values.shape)}"
        return f"lambdas={shown}, learnable={self.learnable}"


def _past_length(kwargs: dict) -> tuple[int | None, bool]:
    """Tokens already in the forward's KV cache (None when the cache counts them in a tensor, as a static cache
    does: reading it would sync the device), and whether it has a cache at all."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0, False
    if not hasattr(cache, "get_seq_length"):
        raise ValueError(f"HSA needs a transformers Cache object as the KV cache, got {type(cache).__name__}")
    past = cache.get_seq_length()
    return (None if isinstance(past, torch.Tensor) else past), True


def _check_ids(semantic_ids: torch.Tensor, names: list[str]) -> None:
    """Type ids in range. On the host (CPU, eager), a clear error; on an accelerator or under torch.compile, an
    asynchronous device assert: reading the ids there would stall the stream and break the graph."""
    n_types = len(names)
    if semantic_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if semantic_ids.numel() and (int(semantic_ids.min()) < 0 or int(semantic_ids.max()) >= n_types):
            raise ValueError(
                f"semantic_ids holds ids outside [0, {n_types}): the model knows {n_types} types ({', '.join(names)})"
            )
        return
    torch._assert_async(
        ((semantic_ids >= 0) & (semantic_ids < n_types)).all(), f"semantic_ids holds ids outside [0, {n_types})"
    )


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
    past, cached = _past_length(kwargs)
    new_tokens = ref.shape[1] if ref is not None else None
    known = ref is not None and past is not None
    if semantic_ids.ndim != 2 or (
        ref is not None
        and (semantic_ids.shape[0] != ref.shape[0] or (known and semantic_ids.shape[1] != past + new_tokens))
    ):
        shape = (ref.shape[0], past + new_tokens) if known else (ref.shape[0] if ref is not None else "?", "...")
        cover = f": the {past} cached tokens and the {new_tokens} new ones" if cached and known else ""
        raise ValueError(
            f"semantic_ids has shape {tuple(semantic_ids.shape)}; expected (batch, seq_len) = {shape}{cover}"
        )
    hsa: HSALambdas = model.hsa
    lambdas = hsa.values()
    semantic_ids = semantic_ids.to(device=lambdas.device, dtype=torch.long)
    _check_ids(semantic_ids, model.config.hsa["types"])
    if model.config.hsa.get("debug"):
        from hsa_train.model.debug import check_batch

        check_batch(model, semantic_ids, kwargs, ref)
    kwargs["hsa_context"] = HSAForwardContext(
        semantic_ids,
        lambdas,
        model.config.hsa["head_scaling"],
        num_heads=attention_heads(model),
        dtype=_compute_dtype(model),
        position_ids=text_positions(kwargs.get("position_ids")),
        new_tokens=new_tokens,
        cached=cached,
        debug_names=model.config.hsa["types"] if model.config.hsa.get("debug") else None,
    )
    return args, kwargs


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter's): float64 models get a float64 bias."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def text_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The token positions that say where packed documents restart: the ids themselves, or for a vision-language
    model's (4, B, L) rope positions their first row (transformers' convention: the text positions stacked over
    the temporal / height / width ones). Distances always count tokens, never rope positions."""
    if position_ids is not None and position_ids.ndim == 3:
        return position_ids[0] if position_ids.shape[0] == 4 else None
    return position_ids


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
    learnable: bool | str | None = None,
    generated_type: str | None = None,
    debug: bool | None = None,
) -> nn.Module:
    """Enables HSA on `model` in place and returns it. Arguments left as None keep what `model.config.hsa` holds
    (after `from_pretrained` of an HSA model), else the SPEC defaults. `lambdas` may name only the types it
    changes; giving any replaces λ learned per head. A generative model also learns `generate(semantic_ids=...)`
    (`HSAGenerationMixin`)."""
    base = hsa_settings(model) or HSASettings()
    new_types = list(types) if types is not None else base.types
    merged = {k: v for k, v in base.lambdas.items() if k in new_types}
    merged.update(dict(lambdas or {}))
    keep_per_head = base.lambdas_per_head if not lambdas and types is None else None
    inherited_generated = base.generated_type if base.generated_type in new_types else None
    settings = replace(
        base,
        types=new_types,
        default_type=default_type if default_type is not None else base.default_type,
        lambdas=merged,
        head_scaling=head_scaling if head_scaling is not None else base.head_scaling,
        backend=backend if backend is not None else base.backend,
        learnable=learnable if learnable is not None else base.learnable,
        generated_type=generated_type if generated_type is not None else inherited_generated,
        lambdas_per_head=keep_per_head,
        debug=debug if debug is not None else base.debug,
    )
    name = register(settings.backend)
    try:  # the language model only: a vision tower keeps its own attention (SPEC §3)
        model.set_attn_implementation(attn_implementation_for(model, name))
    except ValueError as exc:  # transformers' own refusal, e.g. a model that declares no sdpa support
        first = str(exc).strip().split(". ")[0]
        raise ValueError(
            f"hsa.backend={settings.backend} on {type(model).__name__}: {first}; use hsa.backend=auto"
        ) from None
    if text_attn_implementation(model) != name:
        raise RuntimeError(
            f"{type(model).__name__} did not accept attn_implementation={name!r}: its attention does not go "
            "through transformers' AttentionInterface, so HSA cannot reach it"
        )
    model.config.hsa = settings.to_dict()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    heads = attention_heads(model)
    model.hsa = HSALambdas(settings.lambda_tensor(heads), bool(settings.learnable)).to(device)
    if getattr(model, "_hsa_hook", None) is None:
        model._hsa_hook = model.register_forward_pre_hook(_hsa_pre_hook, with_kwargs=True)
    with_generation(model)
    return model


def attention_heads(model: nn.Module) -> int:
    """Query heads per attention layer, from the (text) config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise ValueError(f"{type(model).__name__}: its config names no num_attention_heads")
    return int(heads)


def sync_hsa_config(model: nn.Module, values: torch.Tensor | None = None) -> None:
    """Writes learned λ back into `model.config.hsa` before saving (fixed λ are already there, exactly).
    `values` are the raw λ when the caller holds them gathered (FSDP); else they are read from the model."""
    hsa = getattr(model, "hsa", None)
    if not (getattr(model.config, "hsa", None) and isinstance(hsa, HSALambdas) and hsa.learnable):
        return
    raw = (values if values is not None else hsa.raw).detach().clamp_min(0.0).float().cpu()
    types = model.config.hsa["types"]
    if raw.ndim == 1:
        model.config.hsa = {**model.config.hsa, "lambdas": dict(zip(types, raw.tolist()))}
        return
    # per head: the table, and its mean over heads as the per-type summary a reader sees first
    per_head = {t: raw[:, i].tolist() for i, t in enumerate(types)}
    mean = dict(zip(types, raw.mean(dim=0).tolist()))
    model.config.hsa = {**model.config.hsa, "lambdas": mean, "lambdas_per_head": per_head}


def learned_lambdas(model: nn.Module) -> dict[str, float] | None:
    """Learnable λ as they stand (per type; the mean over heads for per-head λ), for logging; None when fixed.
    Finds the λ module wherever wrappers (DDP, peft) put it; a sharded (FSDP) tensor is gathered."""
    module = next((m for m in model.modules() if isinstance(m, HSALambdas)), None)
    if module is None or not module.learnable:
        return None
    owner = next(m for m in model.modules() if getattr(m, "hsa", None) is module)
    raw = module.raw.detach()
    raw = raw.full_tensor() if hasattr(raw, "full_tensor") else raw
    values = raw.clamp_min(0.0).float()
    values = values.mean(dim=0) if values.ndim == 2 else values
    return dict(zip(owner.config.hsa["types"], values.cpu().tolist()))
