"""Semantic types without annotations: per-dataset rules that type each message, and a report of how many tokens
got each type from which rule.

Precedence, for each message (the first that applies wins; `type_rule` records which):

1. an explicit `semantic_type` on the message ("explicit");
2. the dataset's `semantic_type_rules`, in order: the first whose `pattern` `re.search`es the content and whose
   optional `role` is the message's role ("rule:<i>:<pattern>"). Rules come before the role map because they are
   the more specific: `^Task:` -> GLOBAL_CONDITION should win over user -> PROCESS_NOISE;
3. `semantic_type_by_role` ("role:<role>");
4. the dataset's `default_semantic_type` ("dataset_default");
5. the run's default type (`hsa.default_type`, "default").

Span types (content parts with their own `semantic_type`) are kept as given: they type their characters whatever
the message's type is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hsa_train.data.spec import DatasetSpec
from hsa_train.types import SemanticTypes


class TypeRules:
    """A dataset's typing rules, compiled once. `apply(messages)` sets `semantic_type` and `type_rule` on each."""

    def __init__(self, spec: DatasetSpec | None, types: SemanticTypes):
        spec = spec or DatasetSpec(path="")
        self.types = types
        self.rules = [
            (re.compile(rule["pattern"]), rule["type"], rule.get("role"), f"rule:{i}:{rule['pattern']}")
            for i, rule in enumerate(spec.semantic_type_rules)
        ]
        self.by_role = dict(spec.semantic_type_by_role)
        self.dataset_default = spec.default_semantic_type
        for name in [t for _, t, _, _ in self.rules] + list(self.by_role.values()) + [self.dataset_default]:
            if name is not None and name not in types.names:  # resolve_datasets checks this; a spec built by hand
                raise ValueError(
                    f"unknown semantic type {name!r} in the typing rules (known: {', '.join(types.names)})"
                )

    def type_of(self, message: Mapping[str, Any]) -> tuple[str, str]:
        """(type name, rule) of one message."""
        explicit = message.get("semantic_type")
        if explicit is not None:
            return explicit, "explicit"
        role, content = message["role"], message["content"]
        for pattern, name, rule_role, label in self.rules:
            if (rule_role is None or rule_role == role) and pattern.search(content):
                return name, label
        if role in self.by_role:
            return self.by_role[role], f"role:{role}"
        if self.dataset_default is not None:
            return self.dataset_default, "dataset_default"
        return self.types.default, "default"

    def apply(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Types every message in place (and returns the list)."""
        for message in messages:
            message["semantic_type"], message["type_rule"] = self.type_of(message)
        return messages


@dataclass
class TypingReport:
    """Token counts per (type name, rule). The rule is the message's `type_rule`, "span" for tokens whose type
    differs from their message's (typed by a span), "template" for tokens of no message. Mergeable across workers."""

    counts: Counter = field(default_factory=Counter)

    def add(
        self,
        messages: Sequence[Mapping[str, Any]],
        message_index: Sequence[int],
        semantic_ids: Sequence[int],
        type_names: Sequence[str],
    ) -> None:
        """Counts one encoded record: per token, the message it came from (-1: none) and its type id."""
        if len(message_index) != len(semantic_ids):
            raise ValueError(f"typing report: {len(message_index)} message indices for {len(semantic_ids)} type ids")
        width = len(type_names)
        keys = (np.asarray(message_index, dtype=np.int64) + 1) * width + np.asarray(semantic_ids, dtype=np.int64)
        tally = np.bincount(keys) if len(keys) else np.zeros(0, dtype=np.int64)
        for key in np.flatnonzero(tally).tolist():
            mi, sid = divmod(key, width)
            mi, n, name = mi - 1, int(tally[key]), type_names[sid]
            if mi < 0:
                rule = "template"
            else:
                message = messages[mi]
                rule = message.get("type_rule", "default") if name == message.get("semantic_type") else "span"
            self.counts[(name, rule)] += n

    def merge(self, other: TypingReport) -> TypingReport:
        self.counts.update(other.counts)
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        """{type: {rule: tokens}}, types and rules sorted."""
        out: dict[str, dict[str, int]] = {}
        for (name, rule), n in sorted(self.counts.items()):
            out.setdefault(name, {})[rule] = n
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, int]]) -> TypingReport:
        return cls(Counter({(name, rule): n for name, rules in data.items() for rule, n in rules.items()}))

    @classmethod
    def merged(cls, reports: Iterable[TypingReport]) -> TypingReport:
        out = cls()
        for report in reports:
            out.merge(report)
        return out

    def rows(self) -> list[tuple[str, str, int, float]]:
        """(type, rule, tokens, share of all tokens): the types with most tokens first, within a type its rules
        with most tokens first. Every view of the report (table, log line, inspect) shows these rows."""
        total = max(self.total, 1)
        by_type = Counter()
        for (name, _), n in self.counts.items():
            by_type[name] += n
        order = sorted(self.counts.items(), key=lambda kv: (-by_type[kv[0][0]], kv[0][0], -kv[1], kv[0][1]))
        return [(name, rule, n, n / total) for (name, rule), n in order]

    def summary(self) -> list[str]:
        """The rows as a small table: type, rule, tokens, share of all tokens."""
        rows = self.rows()
        if not rows:
            return ["no tokens typed"]
        width_t = max(4, *(len(t) for t, _, _, _ in rows))
        width_r = max(4, *(len(r) for _, r, _, _ in rows))
        lines = [f"{'type':<{width_t}}  {'rule':<{width_r}}  {'tokens':>10}  share"]
        for name, rule, n, share in rows:
            lines.append(f"{name:<{width_t}}  {rule:<{width_r}}  {n:>10}  {100 * share:5.1f}%")
        lines.append(f"{'total':<{width_t}}  {'':<{width_r}}  {self.total:>10}  100.0%")
        return lines

    def line(self) -> str:
        """The rows on one line, per type its share and its rules' shares (the run's log)."""
        parts: dict[str, list[str]] = {}
        shares: Counter = Counter()
        for name, rule, _, share in self.rows():
            parts.setdefault(name, []).append(f"{rule} {share:.1%}")
            shares[name] += share
        return "; ".join(f"{name} {shares[name]:.1%} ({', '.join(rules)})" for name, rules in parts.items())
