"""Runs a performing device for N sessions and judges whether each ran as intended.

A run is good when every UPS it took ended COMPLETED, except deliveries canceled by the
interruption the run itself injected (and their continuations then completed). Anything
refused, failed or canceled for another reason makes the run fail, with the reasons.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devices.base import DeviceError
from emulator.net import scu
from emulator.net.scu import AssociationFailed, AssociationRejected, DimseError
from emulator.performer.tms_link import TmsUnavailable
from emulator.performer.workflow import PerformingDevice, UpsOutcome

LOG = logging.getLogger("tdw.device")


@dataclass
class RunReport:
    outcomes: list[UpsOutcome] = field(default_factory=list)
    sessions: int = 0
    problems: list[str] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)  # conformance findings on the TMS
    # UPS whose COMPLETED or CANCELED the TMS had not accepted when the run ended; the
    # journal keeps them and the next run on the same data dir tries again.
    final_pending: list[dict] = field(default_factory=list)

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
            "final_pending": self.final_pending,
            "outcomes": [asdict(o) for o in self.outcomes],
        }
        path.write_text(json.dumps(data, indent=2))
        return path


def judge(outcomes: list[UpsOutcome], injected_interrupt: bool) -> list[str]:
    """The problems of a run: every UPS not COMPLETED, except a delivery canceled by the
    interruption the run injected, and a claim an earlier run decided to end that this run
    only got the TMS to accept."""
    problems = []
    for o in outcomes:
        # A flag is a problem whatever the state: a beam off its planned meterset.
        problems += [f"{o.label or o.sop_instance_uid}: {flag}" for flag in o.flags]
        if o.state == "COMPLETED":
            continue
        if o.settled and o.state in ("COMPLETED", "CANCELED"):
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


# How long `tdw-emu run` waits for a TMS to answer at all before it calls the address a
# set-up mistake (exit 2). Once it has answered, an outage is retried for
# --tms-retry-window (a restart, a network blip), which is another matter.
FIRST_CONTACT_S = 15.0


class TmsUnreachable(ValueError):
    """The TMS never answered: a wrong address, or it is not running (exit 2)."""


def reach_tms(device: PerformingDevice, window_s: float = FIRST_CONTACT_S) -> None:
    """A C-ECHO to the TMS, tried for ``window_s``: it answering anything is enough (a TMS
    may refuse Verification, or reject an association it has no use for: the worklist
    query then says what it thinks of this device)."""
    config = device.config
    deadline = time.monotonic() + window_s
    while True:
        try:
            scu.echo(config.ae_title, config.tms, config.network)
            return
        except AssociationFailed as exc:
            if time.monotonic() >= deadline:
                raise TmsUnreachable(
                    f"the TMS {config.tms} did not answer within {window_s:g} s: {exc} (once "
                    "it has answered, an outage is retried for --tms-retry-window, "
                    f"{config.tms_retry_window:g} s)"
                ) from exc
        except DimseError:
            return  # a rejection, a refused Verification: it is there
        time.sleep(1.0)


def run_sessions(
    device: PerformingDevice,
    sessions: int | None = 1,
    wait_seconds: float = 0.0,
    poll_seconds: float = 1.0,
) -> RunReport:
    """Queries and performs until ``sessions`` rounds found work (or the wait runs out);
    ``sessions=None`` until a round finds nothing for this device after the wait, which is
    then the end of the work, not a problem."""
    report = RunReport()
    deadline = time.monotonic() + wait_seconds
    while sessions is None or report.sessions < sessions:
        try:
            outcomes = device.run_once()
        except AssociationRejected as exc:
            if exc.permanent and not report.outcomes:
                raise  # a set-up problem before any work: the command says so and exits 2
            LOG.debug("the run stopped", exc_info=True)
            report.problems.append(f"the run stopped: {exc}")
            break
        except (TmsUnavailable, DimseError, DeviceError, OSError) as exc:
            # Whatever happened, the run ends with a report, not a traceback (-v logs it).
            LOG.debug("the run stopped", exc_info=True)
            report.problems.append(f"the run stopped: {type(exc).__name__}: {exc}")
            break
        if outcomes:
            report.sessions += 1
            report.outcomes.extend(outcomes)
        if device.stopping:
            break  # the operator stopped the device: nothing more is started
        if outcomes:
            continue
        if time.monotonic() >= deadline:
            if sessions is not None:
                found = f"found work for {report.sessions} of {sessions} sessions on the worklist"
                if not report.sessions:
                    found = (
                        f"the worklist of {device.config.tms} holds nothing for station "
                        f"{device.config.station} that a {device.config.kind.upper()} takes "
                        "today: schedule a session there (tdw-emu tms --seed "
                        f"{device.config.station}, or tdw-emu tms schedule)"
                    )
                report.problems.append(found)
            break
        time.sleep(poll_seconds)
    _settle(device, report)
    report.problems = judge(report.outcomes, bool(device.config.interlocks)) + report.problems
    return report


def _settle(device: PerformingDevice, report: RunReport) -> None:
    """Retries pending final transitions for up to the TMS retry window, then reports what
    is still pending (each also stays in the device's journal for the next run)."""
    if device.pending_claims():
        ended = {o.sop_instance_uid: o for o in device.settle(device.config.tms_retry_window)}
        for index, outcome in enumerate(report.outcomes):
            if outcome.sop_instance_uid in ended:
                settled = ended[outcome.sop_instance_uid]
                settled.label = settled.label or outcome.label
                settled.session = outcome.session
                settled.delivered = settled.delivered or outcome.delivered
                settled.delivery_type = settled.delivery_type or outcome.delivery_type
                report.outcomes[index] = settled
    reasons = {o.sop_instance_uid: o.reason for o in report.outcomes}
    for claim in device.pending_claims():
        report.final_pending.append(
            {
                "ups": claim.ups_uid,
                "step": claim.step,
                "target": claim.target or "COMPLETED",
                "reason": reasons.get(claim.ups_uid, ""),
            }
        )
