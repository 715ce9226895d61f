"""The HSA settings: one dataclass, validated once, for every place that holds them.

The run config's `hsa` group is this dataclass's fields plus `enabled` (`config.HSAConfig` is derived from it);
`enable_hsa(model, settings)` takes it; `model.config.hsa` is its `to_dict()`, so `save_pretrained` /
`from_pretrained` round-trip it. Plain Python: validating a config never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from hsa_train.types import (
    BACKENDS,
    DEFAULT_LAMBDAS,
    DEFAULT_TYPE,
    DEFAULT_TYPES,
    HEAD_SCALINGS,
    LEARNABLE,
    SemanticTypes,
)


@dataclass
class HSASettings:
    """What `enable_hsa` puts on a model (conf/hsa/default.yaml documents each field). `lambdas_per_head` is
    written by training (`learnable: per_head`), never set by hand."""

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
        self.semantic_types.lambda_vector(self.lambdas)  # names and values (SemanticTypes says what is wrong)
        if self.head_scaling not in HEAD_SCALINGS:
            raise ValueError(
                f"hsa.head_scaling={self.head_scaling!r} is not allowed; use one of: {', '.join(HEAD_SCALINGS)}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"hsa.backend={self.backend!r} is not allowed; use one of: {', '.join(BACKENDS)}")
        if self.learnable not in LEARNABLE or not isinstance(self.learnable, (bool, str)):
            raise ValueError(
                f"hsa.learnable={self.learnable!r}: use false, true (one λ per type) or per_head (one per head and "
                "type)"
            )
        if self.generated_type is not None and self.generated_type not in self.types:
            raise ValueError(
                f"hsa.generated_type={self.generated_type!r} is not one of hsa.types {self.types}; name one, or "
                "null for hsa.default_type"
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HSASettings:
        """From a config node or a saved `model.config.hsa`; keys that are not settings (the config's `enabled`)
        are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    @classmethod
    def of(cls, model: Any) -> HSASettings | None:
        """The settings an HSA model carries in its config, or None."""
        stored = getattr(getattr(model, "config", None), "hsa", None)
        return cls.from_mapping(stored) if stored else None

    def changed(self, lambdas: Mapping[str, float] | None = None, **changes: Any) -> HSASettings:
        """These settings with `changes` (field names; None keeps a field). `lambdas` may name only the types it
        changes; new `types` keep the λ of the types they still have; any λ given replaces λ learned per head."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)} - {"lambdas"})
        if unknown:
            known = ", ".join(f.name for f in fields(self) if f.name != "lambdas_per_head")
            raise TypeError(f"enable_hsa: unknown HSA setting(s) {unknown}; the settings are: {known}")
        changes = {k: v for k, v in changes.items() if v is not None}
        types = list(changes.get("types", self.types))
        merged = {k: v for k, v in self.lambdas.items() if k in types}
        merged.update(dict(lambdas or {}))
        keep_per_head = self.lambdas_per_head if not lambdas and "types" not in changes else None
        generated = self.generated_type if self.generated_type in types else None
        new = {"generated_type": generated, **changes}
        new.update(types=types, lambdas=merged, lambdas_per_head=keep_per_head)
        return replace(self, **new)


def model_types(model: Any) -> SemanticTypes:
    """The semantic types an HSA model decays by (its `model.config.hsa`): the one source of truth that the
    tokenizer and collator feeding it take theirs from (`SemanticTokenizer.from_model`)."""
    settings = HSASettings.of(model)
    if settings is None:
        raise ValueError("the model has no HSA settings (model.config.hsa): enable_hsa(model, ...) first")
    return settings.semantic_types


def check_types(model: Any, types: SemanticTypes, theirs: str = "the tokenizer") -> None:
    """Raises when `types` (a tokenizer's, a collator's) differ from the model's: the same id would mean
    another type, and the wrong tokens would fade without a word."""
    model_types(model).require_same(types, "the model", theirs)
