"""How a run turned messages into tokens, saved into its model folder (`hsa_rules.json`) so that generation, the
agent runtime and the server type and cut a conversation as training did.

Without it a deployed model sees every untyped message as `default_type`: a model trained to keep `Event:` lines as
KEY_EVENT would let them fade as noise. The file holds each training dataset's typing rules (typing.py's
precedence: explicit type, rules, role map, dataset default, run default), the name of the set that types a
message of unknown source (`export.typing_dataset`; null: the training dataset with the most weight), and the
truncation settings (cutoff_len, keep_types) a session is cut by, and the observation window (`data.noise_window`)
it is masked by.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hsa_train.data.formats import make_converter
from hsa_train.data.spec import DatasetPlan, DatasetSpec
from hsa_train.data.typing import TypeRules
from hsa_train.types import DEFAULT_KEEP_TYPES, SemanticTypes

RULES_FILE = "hsa_rules.json"
RULE_FIELDS = ("default_semantic_type", "semantic_type_by_role", "semantic_type_rules")


@dataclass
class SavedRules:
    """A run's typing rules per dataset name, the default set's name, and its truncation settings."""

    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default: str | None = None
    cutoff_len: int | None = None
    keep_types: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_TYPES))
    noise_window: int | None = None  # observation masking: the newest N noise turns stay (truncate.window_noise)

    def __post_init__(self) -> None:
        if self.default is not None and self.default not in self.datasets:
            raise ValueError(
                f"typing rules: the default set {self.default!r} is not one of the saved datasets "
                f"({', '.join(self.datasets) or 'none'})"
            )

    @classmethod
    def from_plan(
        cls,
        plan: DatasetPlan,
        cutoff_len: int | None,
        keep_types: Sequence[str],
        default: str | None = None,
        noise_window: int | None = None,
    ) -> SavedRules:
        """The training datasets' rules; `default` names the set for messages of unknown source (None: the
        training dataset with the most weight, the first on ties)."""
        datasets = {spec.name: _rules_of(spec) for spec in plan.train}
        if default is None and plan.train:
            default = max(plan.train, key=lambda s: s.weight).name  # max keeps the first of equal weights
        if default is not None and default not in datasets:
            raise ValueError(
                f"export.typing_dataset={default!r} is not a training dataset; name one of: {', '.join(datasets)}"
            )
        return cls(datasets, default, cutoff_len, list(keep_types), noise_window)

    def spec(self, path: str = "", dataset: str | None = None) -> DatasetSpec:
        """A `messages`-format DatasetSpec for `path` typed by the set `dataset` (None: the default set)."""
        return DatasetSpec(path=path, **self.rules(dataset))

    def rules(self, dataset: str | None = None) -> dict[str, Any]:
        name = dataset if dataset is not None else self.default
        if name is None:
            return {}
        if name not in self.datasets:
            known = ", ".join(self.datasets) or "none: the model folder has no saved typing rules"
            raise ValueError(f"typing rules {name!r}: the model was trained on no such dataset (known: {known})")
        return dict(self.datasets[name])

    def type_rules(self, types: SemanticTypes, dataset: str | None = None) -> TypeRules:
        return TypeRules(self.spec(dataset=dataset), types)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RULES_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SavedRules:
        """The folder's saved rules; a folder without them (not written by hsa_train, or older) gets none: every
        untyped message then takes the default type, as it did before."""
        path = Path(folder) / RULES_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in (f.name for f in fields(cls)) if k in data})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable typing rules ({exc}); export the model again") from None

    def check(self, types: SemanticTypes) -> None:
        """Every set compiles against the model's types (a hand-edited file fails here, with its set named)."""
        for name in self.datasets:
            try:
                self.type_rules(types, name)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{RULES_FILE}: dataset {name!r}: {exc}") from None
        unknown = [t for t in self.keep_types if t not in types.names]
        if unknown:
            raise ValueError(f"{RULES_FILE}: keep_types {unknown} are not the model's types ({', '.join(types.names)})")


def _rules_of(spec: DatasetSpec) -> dict[str, Any]:
    values = asdict(spec)
    return {k: values[k] for k in RULE_FIELDS}


# OpenAI chat keys that carry no content the model trained on (a message's author name, the id a tool result
# answers), and the rule that typed a message before (a typed message sent again keeps its type, now explicit):
# accepted, never rendered.
CLIENT_KEYS = ("id", "name", "tool_call_id", "type_rule")


class MessageTyper:
    """Messages from outside (a client, an environment, a chat) checked and typed exactly as training data: the
    `messages` format's checks (roles, content parts, span types, tool calls), then the saved rules of `dataset`
    (None: the default set). An explicit `semantic_type` wins; each message gets the `type_rule` that typed it."""

    def __init__(
        self,
        saved: SavedRules,
        types: SemanticTypes,
        dataset: str | None = None,
        ignore_keys: Sequence[str] = CLIENT_KEYS,
    ):
        self.convert = make_converter(saved.spec(dataset=dataset), types, ignore_keys)
        self.rules = saved.type_rules(types, dataset)

    def __call__(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
    ) -> tuple[list[dict[str, Any]], list[Any] | None]:
        """(typed messages, tools); a ValueError names the message and what is wrong."""
        if not messages:  # tools alone (a session's, before its first message): checked on a stand-in message
            if not tools:
                return [], None
            return [], self.convert({"messages": [{"role": "user", "content": "."}], "tools": list(tools)})[1]
        record: dict[str, Any] = {"messages": list(messages)}
        if tools:
            record["tools"] = list(tools)
        converted, tools = self.convert(record)
        return self.rules.apply(converted), tools
