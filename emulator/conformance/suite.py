"""The scenario suite as data (``profiles/scenarios.yaml``): what each scenario needs and does.

Kept apart from the runner so that the reference TMS can schedule what the suite needs
(``tdw-emu tms --seed-scenarios``) without importing the devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emulator.profile import load_yaml


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    reference: str
    station: str
    sessions: int
    steps: list[dict[str, Any]]
    inputs_missing: bool = False
    expected_findings: tuple[str, ...] = ()
    editions: tuple[str, ...] = ()  # empty: every edition
    kind: str = "linac"  # the patient its sessions treat: linac or afterloader (HDR)

    def applies_to(self, edition: str) -> bool:
        return not self.editions or edition in self.editions


def load_scenarios(only: list[str] | None = None, edition: str | None = None) -> list[Scenario]:
    """The suite (for ``edition``, when given), or the named scenarios of it; an unknown
    name, or one the edition does not run, is an error."""
    data = load_yaml("scenarios.yaml")["scenarios"]
    suite = [
        Scenario(
            s["name"],
            s["title"],
            s["reference"],
            s["station"],
            int(s.get("sessions", 1)),
            list(s["steps"]),
            bool(s.get("inputs_missing", False)),
            tuple(s.get("expected_findings", ())),
            tuple(s.get("editions", ())),
            str(s.get("kind", "linac")),
        )
        for s in data
    ]
    if edition:
        suite = [s for s in suite if s.applies_to(edition)]
    if only:
        names = {s.name for s in suite}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(names)}")
        suite = [s for s in suite if s.name in only]
    return suite
