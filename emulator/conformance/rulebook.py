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
    exercised_by: tuple[str, ...] = ()
    cited: str = ""  # the id as the edition numbers its transaction (RO-58 for RO-17 in TDW-II)

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
    seq: int | None = None  # the recorded message it was made on, if one

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
        numbers = transaction_numbers(edition)
        rules = {}
        for raw in data["rules"]:
            cited, reference = _cite(raw["id"], raw["reference"], numbers, edition)
            rule = Rule(
                raw["id"],
                reference,
                raw["severity"],
                " ".join(str(raw["statement"]).split()),
                tuple(raw.get("editions", ())),
                raw.get("peer", ""),
                tuple(raw.get("exercised_by", ())),
                cited,
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

    def cite(self, rule_id: str) -> str:
        """The id a report shows for a rule: its transaction as this edition numbers it."""
        rule = self.rules.get(rule_id)
        return rule.cited if rule else _cite(rule_id, "", transaction_numbers(self.edition), "")[0]

    def finding(
        self,
        rule_id: str,
        message: str,
        attribute: str = "",
        where: str = "",
        seq: int | None = None,
    ) -> Finding:
        rule = self.rules[rule_id]
        return Finding(
            rule.cited,
            rule.severity,
            message,
            attribute,
            rule.statement,
            rule.reference,
            where,
            seq=seq,
        )


def transaction_numbers(edition: str) -> dict[str, str]:
    """RO-17 -> RO-58 and so on, for an edition that renumbers the transactions."""
    data = load_yaml(f"{edition}.yaml") if edition else {}
    return {old: str(t["number"]) for old, t in (data.get("transactions") or {}).items()}


_EDITION_TITLES = {"tdw-ii": "IHE-RO TDW-II"}


def _cite(rule_id: str, reference: str, numbers: dict[str, str], edition: str) -> tuple[str, str]:
    """The rule id and reference as an edition that renumbers transactions cites them: the
    new number first, then the 2008 clause the rule comes from, which that edition keeps."""
    head, sep, tail = rule_id.partition("/")
    number = numbers.get(head)
    if not number:
        return rule_id, reference
    return f"{number}{sep}{tail}", f"{_EDITION_TITLES.get(edition, edition)} {number} ({reference})"


def attribute_label(keyword: str) -> str:
    """``Keyword (gggg,eeee)`` for each part of a '>' path, as findings name attributes."""
    parts = []
    for part in keyword.split(">"):
        tag = tag_for_keyword(part)
        parts.append(f"{part} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else part)
    return ">".join(parts)
