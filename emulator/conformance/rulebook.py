"""The conformance rules of ``profiles/rules.yaml`` and the findings made against them.

A finding always carries what a TMS vendor needs to act on it: the rule id, its severity,
what was observed (message), the offending attribute, the reason (the rule's statement)
and the clause it comes from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.datadict import tag_for_keyword

from emulator.profile import load_yaml

SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Rule:
    id: str
    reference: str
    severity: str
    statement: str
    editions: tuple[str, ...] = ()
    peer: str = ""

    def applies_to(self, edition: str) -> bool:
        return not self.editions or edition in self.editions


@dataclass
class Finding:
    rule: str
    severity: str
    message: str
    attribute: str
    reason: str
    reference: str
    where: str = ""
    expected: bool = False  # a finding the scenario set out to provoke

    @property
    def fails(self) -> bool:
        return self.severity == "error" and not self.expected

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RuleBook:
    """Rules by id for one edition; ``finding`` is the only way findings are made."""

    edition: str
    rules: dict[str, Rule] = field(default_factory=dict)

    @classmethod
    def load(cls, edition: str) -> RuleBook:
        data = load_yaml("rules.yaml")
        rules = {}
        for raw in data["rules"]:
            rule = Rule(
                raw["id"],
                raw["reference"],
                raw["severity"],
                " ".join(str(raw["statement"]).split()),
                tuple(raw.get("editions", ())),
                raw.get("peer", ""),
            )
            if rule.severity not in SEVERITIES:
                raise ValueError(f"rule {rule.id}: severity {rule.severity!r}")
            if rule.applies_to(edition):
                rules[rule.id] = rule
        return cls(edition, rules)

    @staticmethod
    def tables() -> dict[str, Any]:
        """The data tables beside the rules (return keys, inputs, statuses, constraints)."""
        return load_yaml("rules.yaml")

    def __contains__(self, rule_id: str) -> bool:
        return rule_id in self.rules

    def finding(self, rule_id: str, message: str, attribute: str = "", where: str = "") -> Finding:
        rule = self.rules[rule_id]
        return Finding(
            rule.id, rule.severity, message, attribute, rule.statement, rule.reference, where
        )


def attribute_label(keyword: str) -> str:
    """``Keyword (gggg,eeee)`` for each part of a '>' path, as findings name attributes."""
    parts = []
    for part in keyword.split(">"):
        tag = tag_for_keyword(part)
        parts.append(f"{part} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else part)
    return ">".join(parts)
