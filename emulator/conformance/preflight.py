"""Pre-flight: is the TMS under test set up for the suite, before anything is judged?

A TMS that is not listening, a station whose sessions an earlier run used up, or an Archive
that does not know the devices' AE titles says nothing about conformance; reported as rule
findings they would send a vendor chasing the wrong clause. So before the first scenario
the suite checks, with messages that are not recorded (and so not judged):

- C-ECHO to the TMS and to the Archive;
- every scenario's station has as many unused sessions (all four UPS SCHEDULED, today) as
  the scenario needs;
- every device AE is reachable as a C-MOVE destination: the Archive and the TMS each move
  one instance a scheduled UPS references to each device AE's receiver.

Each problem is one line; the CLI reports them as JUnit errors and exits 2.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from emulator.conformance.suite import Scenario
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.net.scu import DimseError, echo, move
from emulator.net.ups_scu import UpsConnection
from emulator.performer import actors
from emulator.performer.workflow import worklist_identifier
from emulator.profile import Profile
from emulator.ups_references import InstanceReference, references_in

MOVE_DESTINATION_UNKNOWN = 0xA801  # PS3.4 Table C.4-2
RESEED_HINT = (
    "schedule them again (a newly prepared kit: tdw-emu scenarios prepare; the reference "
    "TMS: restart it with --fresh --seed-scenarios); see docs/conformance.md, "
    "'Running the suite again'"
)


@dataclass(frozen=True)
class SetupProblem:
    """One reason the suite cannot judge this TMS yet; ``check`` names the pre-flight step."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


@dataclass
class Preflight:
    """The peers the suite talks to, and the settings it talks with (unrecorded)."""

    tms: Peer
    archive: Peer
    devices: list[Peer]
    profile: Profile
    network: NetworkSettings
    listen_host: str | None = None

    def run(self, scenarios: list[Scenario]) -> list[SetupProblem]:
        problems = self._echoes()
        if problems:
            return problems  # nothing further can be asked of a peer that is not there
        worklists, problems = self._sessions(scenarios)
        # A scenario's deliberately missing plan would make its own move fail.
        usable = {s.station for s in scenarios if not s.inputs_missing}
        problems += self._move_destinations(
            {station: found for station, found in worklists.items() if station in usable}
        )
        return problems

    # -- the checks ----------------------------------------------------------------------------

    def _echoes(self) -> list[SetupProblem]:
        problems = []
        caller = self.devices[0].ae_title
        for role, peer in (("TMS", self.tms), ("Archive", self.archive)):
            try:
                status = echo(caller, peer, self.network)
            except (DimseError, OSError, RuntimeError) as exc:
                problems.append(SetupProblem("C-ECHO", f"the {role} {peer} does not answer: {exc}"))
                continue
            if status != 0:
                problems.append(
                    SetupProblem("C-ECHO", f"the {role} {peer} answered 0x{status:04X}")
                )
        return problems

    def _sessions(
        self, scenarios: list[Scenario]
    ) -> tuple[dict[str, list[Dataset]], list[SetupProblem]]:
        """Today's SCHEDULED UPS per station; a problem for each station short of sessions."""
        needed: Counter = Counter()
        for scenario in scenarios:
            needed[scenario.station] += scenario.sessions
        worklists: dict[str, list[Dataset]] = {}
        try:
            with UpsConnection(
                self.devices[0].ae_title, self.tms, self.profile, self.network
            ) as connection:
                for station in needed:
                    # Every state, so a station whose sessions were used is told from one
                    # that never had any.
                    query = worklist_identifier(station)
                    query.ProcedureStepState = ""
                    worklists[station] = connection.find(query)
        except (DimseError, OSError, RuntimeError) as exc:
            problem = f"the TMS {self.tms} did not answer a worklist query: {exc}"
            return worklists, [SetupProblem("worklist", problem)]
        problems = []
        for station, wanted in needed.items():
            sessions: dict[tuple, list[Dataset]] = {}
            for ups in worklists[station]:
                sessions.setdefault(actors.session_key(ups), []).append(ups)
            # Unused: nothing of it was claimed. How many UPS it has is for the rules to
            # judge (RO-17/Response-count), not a set-up problem.
            unused = [
                members
                for members in sessions.values()
                if all(u.get("ProcedureStepState") == "SCHEDULED" for u in members)
            ]
            # Only the unused sessions' inputs are moved: a used one's may be gone.
            worklists[station] = [u for members in unused for u in members]
            if len(unused) >= wanted:
                continue
            users = ", ".join(s.name for s in scenarios if s.station == station)
            if not sessions:
                what = "no session scheduled for today"
            else:
                used = len(sessions) - len(unused)
                what = f"{len(unused)} unused session(s) today ({used} already used)"
            problems.append(
                SetupProblem(
                    "sessions",
                    f"station {station} has {what}; {users} need(s) {wanted}: {RESEED_HINT}",
                )
            )
        return worklists, problems

    def _move_destinations(self, worklists: dict[str, list[Dataset]]) -> list[SetupProblem]:
        """Each retrieve AE named by the worklists moves one of its instances to each device."""
        sample: dict[str, InstanceReference] = {}
        for found in worklists.values():
            for ups in found:
                for ref in references_in(ups.get("InputInformationSequence") or []):
                    sample.setdefault(ref.retrieve_ae_title, ref)
        sources = {self.tms.ae_title: self.tms, self.archive.ae_title: self.archive}
        problems = []
        with tempfile.TemporaryDirectory(prefix="tdw-preflight-") as tmp:
            for device in self.devices:
                receiver = StorageReceiver(
                    Path(tmp) / device.ae_title,
                    device.ae_title,
                    self.profile.sop_classes.archive_storage_uids(),
                    None,
                    self.listen_host or device.host,
                    device.port,
                    self.network,
                )
                try:
                    receiver.start()
                except OSError as exc:
                    problems.append(
                        SetupProblem("C-MOVE", f"{device} cannot listen on this machine: {exc}")
                    )
                    continue
                try:
                    for ae_title, ref in sample.items():
                        source = sources.get(ae_title)
                        if source is None:
                            continue  # an unknown retrieve AE is a finding (RO-17/Note-8)
                        problem = self._move_one(source, ref, device)
                        if problem:
                            problems.append(problem)
                finally:
                    receiver.stop()
        return problems

    def _move_one(self, source: Peer, ref: InstanceReference, device: Peer) -> SetupProblem | None:
        ident = ref.move_identifier()
        try:
            result = move(device.ae_title, source, ident, device.ae_title, self.network)
        except (DimseError, OSError, RuntimeError) as exc:
            if getattr(exc, "status", None) not in (None, MOVE_DESTINATION_UNKNOWN):
                return None  # a move that ran but answered wrongly: for the rules to judge
            return SetupProblem(
                "C-MOVE",
                f"{source.ae_title} cannot send to {device}: {exc}; is {device.ae_title} "
                f"configured there as a peer and move destination at {device.host}:"
                f"{device.port}?",
            )
        if result.completed < 1:
            return SetupProblem(
                "C-MOVE",
                f"{source.ae_title} moved nothing to {device} ({result.failed} failed): can it "
                f"reach {device.host}:{device.port}?",
            )
        return None
