"""One dataset entry of `data.datasets` (`DatasetSpec`) and `resolve_datasets`, which checks every entry before the
model loads: unknown keys or formats, bad weights, regexes that do not compile, types that do not exist. An entry is
a dict, or a string: the name of an entry in a LLaMA-Factory `dataset_info.json` (`data.dataset_info`), else a path.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsa_train.types import SemanticTypes

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "sharegpt", "alpaca")
MEDIA_COLUMNS = ("images", "videos", "audios")
PREFERENCE_COLUMNS = ("chosen", "rejected", "kto_tag")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", *MEDIA_COLUMNS)
COLUMN_KEYS += PREFERENCE_COLUMNS
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")

# The columns each format reads, with their default names (LLaMA-Factory's, plus `system` / `history` / `tools`,
# read when a record has them). `images` / `videos` (LLaMA-Factory's names) hold the media of `<image>` / `<video>`
# placeholders; `audios` is read only where configured, and data in it is an error.
DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "messages": {"messages": "messages", "system": None, "tools": "tools"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
        "tools": "tools",
    },
}
for _cols in DEFAULT_COLUMNS.values():
    _cols.update({"images": "images", "videos": "videos", "audios": None})
DEFAULT_TAGS: dict[str, dict[str, str | None]] = {
    "messages": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": None,
        "system_tag": "system",
    },
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "alpaca": {},
}
ENTRY_KEYS = (
    "path",
    "format",
    "columns",
    "tags",
    "split",
    "subset",
    "weight",
    "max_samples",
    "default_semantic_type",
    "semantic_type_by_role",
    "semantic_type_rules",
    "successful_only",
    "ranking",
    "name",
)
RULE_KEYS = ("pattern", "type", "role")
# dataset_info.json keys (LLaMA-Factory) read here; the hub mirrors are skipped when a file or hf_hub_url is given.
INFO_KEYS = ("file_name", "hf_hub_url", "formatting", "columns", "tags", "split", "subset", "num_samples", "ranking")
INFO_MIRRORS = ("ms_hub_url", "om_hub_url")
INFO_FORMATS = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "messages"}


@dataclass
class DatasetSpec:
    """One dataset, resolved: `columns` and `tags` hold every name the format reads (defaults filled in; None: not
    read). Plain JSON-able values only, so a spec can be fingerprinted with `json.dumps(asdict(spec))`."""

    path: str
    format: str = "messages"
    columns: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_COLUMNS["messages"]))
    tags: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_TAGS["messages"]))
    split: str = "train"
    subset: str | None = None
    weight: float = 1.0
    max_samples: int | None = None
    default_semantic_type: str | None = None
    semantic_type_by_role: dict[str, str] = field(default_factory=dict)
    semantic_type_rules: list[dict[str, str | None]] = field(default_factory=list)
    successful_only: bool = False  # rollout episodes: keep those whose `episode.success` is true
    ranking: bool = False  # preference pairs (LLaMA-Factory's name): a prompt, a chosen and a rejected continuation
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = default_name(self.path)

    @property
    def labelled(self) -> bool:
        """Labelled samples for KTO (LLaMA-Factory's `kto_tag` column): a conversation whose last assistant message
        is desirable (true) or not (false)."""
        return bool(self.columns.get("kto_tag"))


def default_name(path: str) -> str:
    """A short name for reports: a local file's or folder's stem, else the hub id."""
    local = Path(path)
    if local.exists() or local.suffix.lower() in (".json", ".jsonl", ".parquet") or path.startswith(("/", ".")):
        return local.stem or str(path)
    return path


def _close(word: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _plain(value: Any) -> Any:
    """Hydra containers (DictConfig, ListConfig) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _names(kind: str, value: Any, known: Sequence[str]) -> dict[str, str | None]:
    if not isinstance(value, dict):
        raise ValueError(f"{kind} must be a mapping of names, got {type(value).__name__}")
    for key, name in value.items():
        if key not in known:
            raise ValueError(f"{kind}: unknown key {key!r}{_close(str(key), known)} (known: {', '.join(known)})")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{kind}.{key}={name!r}: give a column / tag name (a non-empty string) or null")
    return value


def _columns(value: Any, fmt: str, ranking: bool = False) -> dict[str, str | None]:
    """The format's columns (defaults filled in); with `ranking`, also `chosen` and `rejected`: a continuation each
    (a message or a list of them; alpaca: a response text). `messages: null` (LLaMA-Factory v1's
    chosen_messages / rejected_messages) makes each side a whole conversation, the prompt their common start.
    `kto_tag` names the label column of KTO's labelled samples (read only when given)."""
    value = _names("columns", value or {}, COLUMN_KEYS)
    if value.get("kto_tag") and ranking:
        raise ValueError("columns.kto_tag with ranking: true: a dataset is preference pairs or labelled samples (KTO)")
    preference = [k for k in ("chosen", "rejected") if value.get(k)]
    if preference and not ranking:
        raise ValueError(f"columns {', '.join(preference)}: preference pairs need ranking: true in the entry")
    defaults = dict(DEFAULT_COLUMNS[fmt])
    if ranking:
        defaults.update({"chosen": "chosen", "rejected": "rejected"})
        if fmt == "alpaca":
            defaults["response"] = None  # the two responses are chosen and rejected
    if value.get("kto_tag"):
        defaults["kto_tag"] = None  # labelled samples (stage=kto): the column holding each record's true / false
    wrong = [k for k in value if k not in defaults]
    if wrong:
        raise ValueError(f"columns {', '.join(wrong)} do not apply to format {fmt!r} (it reads: {', '.join(defaults)})")
    out = {**defaults, **value}
    if ranking and fmt == "alpaca" and out.get("response"):
        raise ValueError("columns.response: a ranking alpaca dataset reads its two responses from chosen / rejected")
    return out


def _tags(value: Any, fmt: str) -> dict[str, str | None]:
    if fmt == "alpaca":
        if value:
            raise ValueError("tags do not apply to format 'alpaca' (they name the roles of messages / sharegpt)")
        return {}
    tags = {**DEFAULT_TAGS[fmt], **_names("tags", value or {}, TAG_KEYS)}
    roles = [v for k, v in tags.items() if k not in ("role_tag", "content_tag") and v is not None]
    if len(set(roles)) != len(roles):
        raise ValueError(f"tags: two roles share one tag ({roles}); each role needs its own tag")
    return tags


def _semantic_name(value: Any, types: SemanticTypes, what: str) -> str:
    if not isinstance(value, str) or value not in types.names:
        raise ValueError(f"{what}: unknown semantic type {value!r} (known: {', '.join(types.names)})")
    return value


def _role(value: Any, what: str) -> str:
    if value not in ROLES:
        raise ValueError(f"{what}: unknown role {value!r} (known: {', '.join(ROLES)})")
    return value


def _rules(value: Any, types: SemanticTypes) -> list[dict[str, str | None]]:
    if not isinstance(value, list):
        raise ValueError(f"semantic_type_rules must be a list of {{pattern, type, role}}, got {type(value).__name__}")
    out = []
    for i, rule in enumerate(value):
        what = f"semantic_type_rules[{i}]"
        if not isinstance(rule, dict) or "pattern" not in rule or "type" not in rule:
            raise ValueError(f"{what}={rule!r}: give {{pattern: <regex>, type: <type>, role: <optional role>}}")
        extra = [k for k in rule if k not in RULE_KEYS]
        if extra:
            raise ValueError(f"{what}: unknown key {extra[0]!r} (known: {', '.join(RULE_KEYS)})")
        pattern = rule["pattern"]
        if not isinstance(pattern, str):
            raise ValueError(f"{what}: pattern {pattern!r} is not a string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{what}: pattern {pattern!r} does not compile ({exc})") from None
        role = rule.get("role")
        out.append(
            {
                "pattern": pattern,
                "type": _semantic_name(rule["type"], types, what),
                "role": None if role is None else _role(role, what),
            }
        )
    return out


def _positive(value: Any, what: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        kind_name = "a number" if kind is float else "an integer"
        raise ValueError(f"{what}={value!r}: give {kind_name} > 0")
    return kind(value)


def _spec(entry: dict[str, Any], types: SemanticTypes) -> DatasetSpec:
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r}{_close(str(unknown[0]), ENTRY_KEYS)} (known: {', '.join(ENTRY_KEYS)})"
        )
    path = entry.get("path")
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError("no path: give path (a file, a folder, or a datasets hub id)")
    fmt = entry.get("format") or "messages"
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}{_close(str(fmt), FORMATS)} (known: {', '.join(FORMATS)})")
    by_role = entry.get("semantic_type_by_role") or {}
    if not isinstance(by_role, dict):
        raise ValueError(f"semantic_type_by_role must be a mapping role -> type, got {type(by_role).__name__}")
    default = entry.get("default_semantic_type")
    max_samples = entry.get("max_samples")
    for key in ("successful_only", "ranking"):
        if not isinstance(entry.get(key, False), bool):
            raise ValueError(f"{key}={entry[key]!r}: give true or false")
    ranking = entry.get("ranking", False)
    for key in ("split", "subset", "name"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ValueError(f"{key}={entry[key]!r}: give a string")
    return DatasetSpec(
        path=str(path),
        format=fmt,
        columns=_columns(entry.get("columns"), fmt, ranking),
        tags=_tags(entry.get("tags"), fmt),
        split=entry.get("split") or "train",
        subset=entry.get("subset"),
        weight=_positive(entry.get("weight", 1.0), "weight", float),
        max_samples=None if max_samples is None else _positive(max_samples, "max_samples", int),
        default_semantic_type=None if default is None else _semantic_name(default, types, "default_semantic_type"),
        semantic_type_by_role={
            _role(r, "semantic_type_by_role"): _semantic_name(t, types, f"semantic_type_by_role.{r}")
            for r, t in by_role.items()
        },
        semantic_type_rules=_rules(entry.get("semantic_type_rules") or [], types),
        successful_only=entry.get("successful_only", False),
        ranking=ranking,
        name=entry.get("name") or "",
    )


def load_dataset_info(path: str | Path) -> dict[str, Any]:
    """A LLaMA-Factory dataset_info.json (a JSON object of entries), or a one-line error."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"data.dataset_info={path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"data.dataset_info={path}: not a readable JSON file ({exc})") from None
    if not isinstance(info, dict):
        raise ValueError(f"data.dataset_info={path}: expected a JSON object of dataset entries")
    return info


def _from_info(name: str, info: dict[str, Any], info_path: Path) -> dict[str, Any]:
    """A dataset_info.json entry as a data.datasets entry."""
    if name not in info:
        close = difflib.get_close_matches(name, list(info), n=3)
        known = list(dict.fromkeys(close + list(info)[:5]))
        raise ValueError(f"no entry {name!r} in {info_path} (known: {', '.join(known)}, ...)")
    raw = info[name]
    if not isinstance(raw, dict):
        raise ValueError(f"entry {name!r} in {info_path} is not an object")
    unknown = [k for k in raw if k not in INFO_KEYS + INFO_MIRRORS]
    if unknown or not ("file_name" in raw or "hf_hub_url" in raw):
        what = f"key {unknown[0]!r}" if unknown else f"a source in {[k for k in raw if k.endswith('url')] or 'none'}"
        raise ValueError(
            f"dataset_info {what} is not supported (supported: {', '.join(INFO_KEYS)}; "
            "the source must be file_name or hf_hub_url)"
        )
    fmt = raw.get("formatting", "alpaca")
    if fmt not in INFO_FORMATS:
        raise ValueError(f"formatting {fmt!r} is not supported (known: {', '.join(INFO_FORMATS)})")
    entry: dict[str, Any] = {"name": name, "format": INFO_FORMATS[fmt]}
    entry["path"] = raw["hf_hub_url"] if "hf_hub_url" in raw else str(info_path.parent / raw["file_name"])
    for key in ("columns", "tags", "split", "subset", "ranking"):
        if raw.get(key) is not None:
            entry[key] = raw[key]
    if raw.get("num_samples") is not None:
        entry["max_samples"] = raw["num_samples"]
    return entry


def _label(entry: Any) -> str:
    """ " (name)" for error messages: the entry's name, or a short form of its path."""
    if isinstance(entry, str):
        return f" ({default_name(entry)})"
    if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]:
        return f" ({entry['name']})"
    if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
        return f" ({default_name(entry['path'])})"
    return ""


def resolve_datasets(
    entries: Sequence[Any],
    dataset_info: str | Path | None = None,
    types: SemanticTypes | None = None,
    key: str = "data.datasets",
) -> list[DatasetSpec]:
    """Every entry as a `DatasetSpec`, or a one-line ValueError naming the entry (`data.datasets[1] (glaive): ...`).
    `types`: the run's semantic types (rules, role maps and defaults are checked against them)."""
    types = types or SemanticTypes()
    entries = _plain(entries)
    if not isinstance(entries, list):
        raise ValueError(f"{key} must be a list of dataset entries, got {type(entries).__name__}")
    info = load_dataset_info(dataset_info) if dataset_info else None
    specs = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]" + _label(entry)
        try:
            if isinstance(entry, str) and info is not None:
                entry = _from_info(entry, info, Path(dataset_info))  # type: ignore[arg-type]
            elif isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict):
                raise ValueError(f"expected a mapping (path, format, ...) or a string, got {type(entry).__name__}")
            specs.append(_spec(entry, types))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return specs


@dataclass(frozen=True)
class DatasetPlan:
    """Every dataset a run names, resolved: training, held-out, and each named eval set."""

    train: list[DatasetSpec]
    eval: list[DatasetSpec]
    sets: dict[str, list[DatasetSpec]]

    @property
    def everything(self) -> list[DatasetSpec]:
        """Training, held-out, then the eval sets' datasets, in that order."""
        return [*self.train, *self.eval, *(spec for specs in self.sets.values() for spec in specs)]


def plan_datasets(data_cfg: Any, types: SemanticTypes) -> DatasetPlan:
    """The `data` config's files and entries as a DatasetPlan (a one-line ValueError naming the bad entry)."""
    d = data_cfg

    def specs(files: Sequence[Any], entries: Sequence[Any], key: str) -> list[DatasetSpec]:
        return resolve_datasets(list(files), None, types, key) + resolve_datasets(
            list(entries), d.dataset_info, types, key
        )

    return DatasetPlan(
        train=specs(d.train_files, d.datasets, "data.datasets"),
        eval=specs(d.eval_files, d.eval_datasets, "data.eval_datasets"),
        sets={name: specs([], entries, f"data.eval_sets.{name}") for name, entries in d.eval_sets.items()},
    )
