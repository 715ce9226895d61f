"""`enable_hsa`: turns any transformers model that uses the attention registry into an HSA model (SPEC §3).

No model code is edited. The model's attention implementation is switched to a registered HSA one (attention and
mask functions under the same name), a small `hsa` submodule holds λ (a buffer, or a parameter when learnable),
and a forward pre-hook turns `semantic_ids=` into the per-forward context the attention functions read. The
settings live in `model.config.hsa`, so `save_pretrained` / `from_pretrained` + `enable_hsa()` round-trips them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hsa_train.model.attention import register
from hsa_train.model.context import HSAForwardContext
from hsa_train.model.debug import check_batch
from hsa_train.model.generation import with_generation
from hsa_train.model.settings import HSASettings
from hsa_train.model.vision import attn_implementation_for, text_attn_implementation
from hsa_train.types import one_line


def lambda_table(settings: HSASettings, num_heads: int) -> torch.Tensor:
    """λ per type (T,), or per head and type (H, T) when learned per head (or being learned so)."""
    if settings.lambdas_per_head is not None:
        table = torch.tensor([settings.lambdas_per_head[t] for t in settings.types], dtype=torch.float32).T
        if table.shape[0] != num_heads:
            raise ValueError(
                f"the model's HSA λ were learned for {table.shape[0]} heads, the model has {num_heads} attention heads"
            )
        return table.contiguous()
    vector = torch.tensor(settings.semantic_types.lambda_vector(settings.lambdas), dtype=torch.float32)
    return vector.expand(num_heads, -1).clone() if settings.learnable == "per_head" else vector


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


def enable_hsa(
    model: nn.Module,
    lambdas: Mapping[str, float] | None = None,
    backend: str | None = None,
    *,
    settings: HSASettings | None = None,
    **changes,
) -> nn.Module:
    """Enables HSA on `model` in place and returns it. `settings` (default: what `model.config.hsa` holds after
    `from_pretrained` of an HSA model, else the SPEC defaults) with `changes`: any HSASettings field by name
    (types=, default_type=, head_scaling=, learnable=, generated_type=, debug=); None keeps a field. `lambdas` may
    name only the types it changes; giving any replaces λ learned per head. A generative model also learns
    `generate(semantic_ids=...)` (`HSAGenerationMixin`)."""
    base = settings if settings is not None else (HSASettings.of(model) or HSASettings())
    settings = base.changed(lambdas, backend=backend, **changes)
    name = register(settings.backend)
    try:  # the language model only: a vision tower keeps its own attention (SPEC §3)
        model.set_attn_implementation(attn_implementation_for(model, name))
    except ValueError as exc:  # transformers' own refusal, e.g. a model that declares no sdpa support
        first = one_line(exc, "first").split(". ")[0]
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
    model.hsa = HSALambdas(lambda_table(settings, heads), bool(settings.learnable)).to(device)
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
