"""The vocabulary every layer shares, with nothing heavy imported: semantic types (the names a message may carry in
`semantic_type`, and their ids, SPEC §1), the label of untrained tokens, every allowed value of a choice key, and
the one way an exception becomes a one-line message."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_TYPES: tuple[str, ...] = ("GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE")
DEFAULT_TYPE: str = "PROCESS_NOISE"
DEFAULT_LAMBDAS: dict[str, float] = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignore_index)

# The allowed values of every choice key, defined once: the config, the library and the messages read these.
TRAIN_ON = ("assistant", "last", "all")  # data.train_on
OVERLONG = ("truncate", "drop", "error")  # data.overlong
ON_ERROR = ("raise", "skip")  # data.on_error
BACKENDS = ("eager", "sdpa", "flex", "auto")  # hsa.backend
HEAD_SCALINGS = ("none", "alibi")  # hsa.head_scaling
LEARNABLE = (False, True, "per_head")  # hsa.learnable
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype
QUANTIZATION = ("4bit", "8bit")  # model.quantization (or null)
PRECISIONS = ("auto", "bf16", "fp32")  # train.precision
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")  # train.distributed
STAGES = ("sft", "dpo", "kto")  # stage.name: conf/stage/*.yaml
PREFERENCE_LOSSES = ("sigmoid", "ipo")  # stage.loss
PROGRESS = ("auto", "rich", "plain", "none")  # logging.progress
DIRECTIONS = ("minimize", "maximize")  # objective.direction
DEFAULT_KEEP_TYPES: tuple[str, ...] = ("GLOBAL_CONDITION",)  # types truncation never drops (library callers)


def check_choice(key: str, value: object, choices: tuple) -> None:
    """Raises ValueError, in the one wording every choice key gets, when `value` is not one of `choices`."""
    if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
        raise ValueError(f"{key}={value!r} is not allowed; use one of: {', '.join(map(str, choices))}")


def one_line(exc: BaseException | str, part: str = "all", limit: int | None = None, typed: bool = False) -> str:
    """A message on one line, the only way an error reaches a user here. `part`: "all" (every line joined, spaces
    collapsed: for our own messages), "first" or "last" non-empty line (a library's traceback-like text: its
    first line names the problem, or, for torch's checkpoint errors, its last); `typed` puts the exception's
    class in front; `limit` cuts it. An exception with no text gives its class name."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    if part == "all":
        text = " ".join(lines)
    elif part in ("first", "last"):
        text = lines[0 if part == "first" else -1] if lines else ""
    else:
        raise ValueError(f"one_line: part={part!r}; use all, first or last")
    name = type(exc).__name__ if isinstance(exc, BaseException) else ""
    if typed and name:
        text = f"{name}: {text}" if text else name
    elif not text:
        text = name
    return text[:limit] if limit else text


@dataclass(frozen=True)
class SemanticTypes:
    """An ordered set of type names; a type's id is its index. Shared by the tokenizer, collator and model."""

    names: tuple[str, ...] = DEFAULT_TYPES
    default: str = DEFAULT_TYPE

    def __post_init__(self) -> None:
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise ValueError("semantic types: the list of types is empty; give at least one type name")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"semantic types: {name!r} is not a valid type name; use a non-empty string")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"semantic types: duplicated type names {dup}; each type must appear once")
        if self.default not in names:
            raise ValueError(
                f"semantic types: default_type {self.default!r} is not one of the types {list(names)}; "
                "add it to the types or choose one of them"
            )

    @property
    def default_id(self) -> int:
        return self.names.index(self.default)

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, name: str | None) -> int:
        """The id of `name`; None (a message without a type) maps to the default type."""
        if name is None:
            return self.default_id
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown semantic_type {name!r} (known: {', '.join(self.names)})") from None

    def lambda_vector(self, lambdas: Mapping[str, float]) -> list[float]:
        """λ in id order, checking that every type has exactly one finite, non-negative slope."""
        missing = [n for n in self.names if n not in lambdas]
        extra = [k for k in lambdas if k not in self.names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no λ for {missing}")
            if extra:
                parts.append(f"λ for unknown types {extra}")
            raise ValueError(f"HSA lambdas: {'; '.join(parts)}; give one λ per type of {list(self.names)}")
        out = []
        for name in self.names:
            value = lambdas[name]
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"HSA lambdas: λ[{name}]={value!r} is not a number") from None
            if not value >= 0.0 or value == float("inf"):
                raise ValueError(f"HSA lambdas: λ[{name}]={value} must be finite and >= 0 (0 means no decay)")
            out.append(value)
        return out

    def describe(self) -> str:
        return f"[{', '.join(self.names)}] (default {self.default})"

    def require_same(self, other: SemanticTypes, mine: str, theirs: str) -> None:
        """One source of truth: two parts that exchange type ids must agree on every name, its id and the
        default; a mismatch would silently decay the wrong tokens."""
        if self != other:
            raise ValueError(
                f"semantic types differ: {mine} has {self.describe()}, {theirs} has {other.describe()}; "
                "type ids would mean different types, so give both the same hsa.types and hsa.default_type"
            )

    @classmethod
    def from_names(cls, names: Iterable[str] | None = None, default: str | None = None) -> SemanticTypes:
        return cls(
            tuple(names) if names is not None else DEFAULT_TYPES, default if default is not None else DEFAULT_TYPE
        )


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's `__getattr__` that imports each exported name from its module on first use (PEP 562), so a
    light module of the package (the config schema, the HSA settings) imports without the heavy ones."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
