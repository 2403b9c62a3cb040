"""Runs a performing device for N sessions and judges whether each ran as intended.

A run is good when every UPS it took ended COMPLETED, except deliveries canceled by the
interruption the run itself injected (and their continuations then completed). Anything
refused, failed or canceled for another reason makes the run fail, with the reasons.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emulator.performer.workflow import PerformingDevice, UpsOutcome


@dataclass
class RunReport:
    outcomes: list[UpsOutcome] = field(default_factory=list)
    sessions: int = 0
    problems: list[str] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)  # conformance findings on the TMS

    @property
    def ok(self) -> bool:
        return not self.problems

    def write(self, report_dir: Path) -> Path:
        report_dir.mkdir(parents=True, exist_ok=True)
        path = report_dir / "run-report.json"
        data = {
            "ok": self.ok,
            "sessions": self.sessions,
            "problems": self.problems,
            "findings": self.findings,
            "outcomes": [asdict(o) for o in self.outcomes],
        }
        path.write_text(json.dumps(data, indent=2))
        return path


def judge(outcomes: list[UpsOutcome], injected_interrupt: bool) -> list[str]:
    problems = []
    for o in outcomes:
        if o.state == "COMPLETED":
            continue
        if (
            o.state == "CANCELED"
            and injected_interrupt
            and o.step == "delivery"
            and ("MACHINE termination" in o.reason)
        ):
            continue
        problems.append(f"{o.label or o.sop_instance_uid}: {o.state} {o.reason}".strip())
    return problems


def run_sessions(
    device: PerformingDevice,
    sessions: int = 1,
    wait_seconds: float = 0.0,
    poll_seconds: float = 1.0,
) -> RunReport:
    """Queries and performs until ``sessions`` rounds found work (or the wait runs out)."""
    report = RunReport()
    deadline = time.monotonic() + wait_seconds
    while report.sessions < sessions:
        outcomes = device.run_once()
        if outcomes:
            report.sessions += 1
            report.outcomes.extend(outcomes)
            continue
        if time.monotonic() >= deadline:
            report.problems.append(
                f"found work for {report.sessions} of {sessions} sessions on the worklist"
            )
            break
        time.sleep(poll_seconds)
    report.problems = judge(report.outcomes, bool(device.config.interlocks)) + report.problems
    return report
