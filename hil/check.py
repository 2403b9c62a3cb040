"""``tdw-emu hil check --device URL``: protocol v2 conformance of a real controller.

Each check drives the controller through one clause of ``hil/PROTOCOL.md`` on its own link
(every body checked against ``hil/schemas``) and names the clause it judged, so a firmware
engineer reading a failure knows which paragraph the controller broke. The beams it asks
for are small (a few MU at the lowest dose rate the controller allows) and start with the
gantry where it is.

A controller whose HELLO_REPLY says ``"machine": "afterloader"`` is held to the Afterloader
clauses instead: its capabilities and source, a refusal before anything moves, a short
channel's dwells numbered and timed as measured, RETRACT, and the source retracted when its
host is lost. Its channels are short too (dwells of a second or two; the long ones are
retracted after a few seconds).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devices import schemas
from devices.afterloader import ChannelProgramme, Dwell
from devices.base import BeamProgram, ControlPointProgram, DeviceError
from devices.couch_axes import TableTop, misses
from devices.link import Link, LinkLost
from devices.protocol import PROTOCOL_VERSION, Frame, MessageType
from devices.remote import (
    ImageAssembly,
    channel_to_body,
    link_opener,
    local_datetime,
    program_to_body,
)
from devices.timing import TimingBudget


class CheckFailed(AssertionError):
    """The controller broke the clause the check cites."""


@dataclass
class CheckResult:
    name: str
    clause: str
    ok: bool
    detail: str
    seconds: float


class _Session:
    """One link to the controller with the checker's view of every frame it sent."""

    def __init__(self, opener: Callable) -> None:
        self.link = Link(opener(), validate=False)
        self.frames: list[Frame] = []
        self.arrived: list[float] = []  # when each of ``frames`` arrived (monotonic)
        self.timing = TimingBudget()
        self.hello: dict = {}
        self.loaded: dict = {}  # the last LOADED body of an afterloader's channel

    def close(self) -> None:
        self.link.close()

    def send(self, kind: MessageType, body: dict | None = None) -> None:
        self.link.send(kind, body or {})

    def wait_for(self, kinds: set[MessageType], seconds: float) -> Frame:
        """The next frame of one of ``kinds``; every frame on the way is kept and judged."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = self.link.recv(timeout=0.05)
            if frame is None:
                continue
            self.frames.append(frame)
            self.arrived.append(time.monotonic())
            broken = schemas.problems(frame.type, frame.body)
            if broken:
                raise CheckFailed(f"{frame.type.name} breaks hil/schemas: {broken[0]}")
            if frame.type in kinds:
                return frame
            if frame.type == MessageType.ERROR and MessageType.ERROR not in kinds:
                raise CheckFailed(f"ERROR {frame.body}")
        names = ", ".join(sorted(k.name for k in kinds))
        raise CheckFailed(f"no {names} within {seconds:g} s")

    def start_beam(self, beam: BeamProgram) -> None:
        """LOAD_BEAM, its LOADED within the stated budget, then BEAM_ON."""
        self.send(MessageType.LOAD_BEAM, program_to_body(beam))
        self.wait_for({MessageType.LOADED}, self.timing.limit_for("LOAD_BEAM") or 120)
        self.send(MessageType.BEAM_ON)

    def source_status(self) -> dict:
        self.send(MessageType.GET_SOURCE_STATUS)
        return self.wait_for({MessageType.SOURCE_STATUS}, self.timing.silence_s).body

    def start_channel(self, programme: ChannelProgramme) -> Frame:
        """LOAD_CHANNEL, its LOADED, TREAT and its CHANNEL_STARTED (returned)."""
        self.loaded = self.load_channel(programme)
        self.send(MessageType.TREAT)
        return self.wait_for({MessageType.CHANNEL_STARTED}, self.timing.silence_s)

    def load_channel(self, programme: ChannelProgramme) -> dict:
        self.send(MessageType.LOAD_CHANNEL, channel_to_body(programme))
        return self.wait_for({MessageType.LOADED}, self.timing.silence_s).body

    def run_channel(self, programme: ChannelProgramme) -> tuple[dict, Frame, Frame]:
        """A whole channel: LOADED's body, CHANNEL_STARTED and CHANNEL_ENDED."""
        started = self.start_channel(programme)
        ended = self.wait_for({MessageType.CHANNEL_ENDED}, 120 + programme.total_s)
        return self.loaded, started, ended

    def until_delivering(self) -> tuple[float, float]:
        """The first DWELL_PROGRESS counting source seconds: its count and when it came."""
        while True:
            frame = self.wait_for({MessageType.DWELL_PROGRESS}, 120)
            if float(frame.body["delivered_s"]) > 0:
                return float(frame.body["delivered_s"]), time.monotonic()

    def handshake(self) -> dict:
        self.send(MessageType.HELLO, {"protocol": PROTOCOL_VERSION})
        reply = self.wait_for({MessageType.HELLO_REPLY}, TimingBudget().hello_s)
        self.hello = reply.body
        self.timing = TimingBudget.from_body(reply.body.get("timing"))
        return reply.body


def _small_beam(
    hello: dict, meterset: float, number: int = 1, segments: int = 1, energy: float | None = None
) -> BeamProgram:
    """A static beam of ``segments`` equal segments at the controller's lowest dose rate,
    the gantry where it is (0), inside its capabilities unless ``energy`` says otherwise."""
    caps = hello.get("capabilities", {})
    energy = float((caps.get("energies_mv") or [6.0])[0]) if energy is None else energy
    rate = float(caps.get("min_dose_rate") or 100.0)
    pairs = int(caps.get("mlc_leaf_pairs") or 0)
    mlc = tuple([-10.0] * pairs + [10.0] * pairs)
    points = tuple(
        ControlPointProgram(
            i, round(meterset * i / segments, 4), 0.0, 0.0, (-50.0, 50.0, -50.0, 50.0), mlc
        )
        for i in range(segments + 1)
    )
    return BeamProgram(number, "HILCHECK", energy, rate, meterset, points)


def _channel(hello: dict, number: int, dwells: int, seconds: float) -> ChannelProgramme:
    """Channel ``number`` inside the controller's capabilities: ``dwells`` dwells of
    ``seconds`` each (held to its dwell limits), 5 mm apart back from the tip."""
    caps = hello.get("capabilities", {})
    seconds = max(seconds, float(caps.get("min_dwell_s") or 0.1))
    seconds = min(seconds, float(caps.get("max_dwell_s") or seconds))
    length = min(1000.0, float(caps.get("max_channel_length_mm") or 1000.0))
    return ChannelProgramme(
        number, length, tuple(Dwell(i, 5.0 * i, seconds) for i in range(dwells))
    )


AFTERLOADER_CAPABILITIES = (
    "channels",
    "max_channel_length_mm",
    "min_dwell_s",
    "max_dwell_s",
    "max_dwells_per_channel",
)
# What an afterloader sends in a session that treats one channel (the check's DOOR aside:
# no door is opened by a check).
AFTERLOADER_REPLIES = {
    MessageType.HELLO_REPLY,
    MessageType.HEARTBEAT_REPLY,
    MessageType.SOURCE_STATUS,
    MessageType.LOADED,
    MessageType.CHANNEL_STARTED,
    MessageType.DWELL_PROGRESS,
    MessageType.DWELL_DONE,
    MessageType.CHANNEL_ENDED,
}


class ControllerCheck:
    """The checks of PROTOCOL.md, in order; ``run`` returns one result each."""

    def __init__(self, spec: str) -> None:
        self.opener, _ = link_opener(spec)
        self.results: list[CheckResult] = []
        self._machine: str | None = None

    def machine(self) -> str:
        """The machine the controller says it drives (HELLO_REPLY ``machine``, ``linac`` when
        it says none). A controller that cannot be greeted gets the linac's checks, which
        then fail on the link."""
        if self._machine is None:
            try:
                with self._greeted() as session:
                    self._machine = str(session.hello.get("machine") or "linac")
            except (CheckFailed, LinkLost, OSError):
                self._machine = "linac"
        return self._machine

    def _session(self) -> _Session:
        try:
            return _Session(self.opener)
        except (OSError, LinkLost) as exc:
            raise CheckFailed(f"cannot open the link: {exc}") from exc

    @contextlib.contextmanager
    def _greeted(self) -> Iterator[_Session]:
        """A fresh link on which HELLO was answered; closed afterwards."""
        session = self._session()
        try:
            session.handshake()
            yield session
        finally:
            session.close()

    def _run_one(self, name: str, clause: str, check: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail, ok = check(), True
        except (CheckFailed, LinkLost) as exc:
            detail, ok = str(exc), False
        seconds = round(time.monotonic() - started, 2)
        self.results.append(CheckResult(name, clause, ok, detail, seconds))

    def checks(self) -> list[tuple[str, str, Callable[[], str]]]:
        """Every check: its name, the PROTOCOL.md clause it holds a controller to, and the
        method that tries it. An afterloader's are :meth:`afterloader_checks`."""
        if self.machine() == "afterloader":
            return self.afterloader_checks()
        return [
            ("handshake and version", "Versioning; HELLO_REPLY", self.check_handshake),
            ("every message type", "Message types", self.check_messages),
            ("NAK and retransmission", "Reliability", self.check_nak),
            ("heartbeat", "Reliability (Heartbeat)", self.check_heartbeat),
            ("answers while moving, PROGRESS cadence", "Timing", self.check_answers_while_busy),
            ("BUSY on a second long operation", "Timing", self.check_busy),
            ("ERROR LIMIT and NOT_LOADED", "Errors", self.check_errors),
            ("control point numbering", "Delivery", self.check_control_points),
            ("couch move read back per axis", "Couch; Units and axes", self.check_couch),
            ("image round trip", "Images", self.check_images),
            ("interrupt during a beam", "Controller states", self.check_interrupt),
            ("beam stopped when the host is lost", "Safety", self.check_host_loss),
            ("reconnect with last_delivery", "Safety", self.check_reconnect),
        ]

    def run(self, only: Collection[str] = ()) -> list[CheckResult]:
        """Runs the checks in order, or only those named (to retry one a fix was for)."""
        for name, clause, check in self.checks():
            if not only or name in only:
                self._run_one(name, clause, check)
        return self.results

    # -- the checks ------------------------------------------------------------------------

    def check_handshake(self) -> str:
        with self._greeted() as session:
            body = session.hello
            if body.get("protocol") != PROTOCOL_VERSION:
                raise CheckFailed(
                    f"HELLO_REPLY protocol {body.get('protocol')!r}, not {PROTOCOL_VERSION}"
                )
            if "timing" not in body:
                raise CheckFailed("HELLO_REPLY states no timing budget")
            identity = body["identity"]
            return f"{identity['vendor']} {identity['model']} {identity['serial']}"

    def check_messages(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            session.send(MessageType.GET_STATE)
            session.wait_for({MessageType.STATE}, budget.silence_s)
            session.send(MessageType.HEARTBEAT)
            session.wait_for({MessageType.HEARTBEAT_REPLY}, budget.silence_s)
            beam = _small_beam(session.hello, 2.0)
            session.start_beam(beam)
            session.wait_for({MessageType.BEAM_STARTED}, budget.silence_s)
            ended = session.wait_for({MessageType.BEAM_ENDED}, 120)
            if ended.body["termination"] != "NORMAL":
                raise CheckFailed(f"a 2 MU beam ended {ended.body['termination']}")
            seen = {f.type for f in session.frames}
            if MessageType.METERSET not in seen:
                raise CheckFailed("no METERSET during the beam")
            session.send(MessageType.MOVE_COUCH, TableTop(lateral_mm=0.5).as_body())
            session.wait_for({MessageType.COUCH_POSITION}, budget.limit_for("MOVE_COUCH") or 120)
            return f"{len(session.frames)} frames, every body follows its schema"

    def check_nak(self) -> str:
        with self._greeted() as session:
            naks = session.link.counters.naks_received
            expected = session.link.next_seq  # what the controller expects from us next
            session.link.transport.write(b"\x05\x01\x02\x03\x04\x00")  # a frame that fails COBS/CRC
            session.send(MessageType.HEARTBEAT)  # and the next one must still get through
            session.wait_for({MessageType.HEARTBEAT_REPLY}, session.timing.silence_s)
            if session.link.counters.naks_received <= naks:
                raise CheckFailed("a garbled frame was not answered with NAK")
            said = session.link.counters.last_nak_seq
            if said != expected:
                raise CheckFailed(f"the NAK carried seq {said}, not the {expected} expected")
            return "garbled frame NAKed with the expected seq, the next frame answered"

    def check_heartbeat(self) -> str:
        with self._greeted() as session:
            worst = 0.0
            for _ in range(5):
                sent = time.monotonic()
                session.send(MessageType.HEARTBEAT)
                session.wait_for({MessageType.HEARTBEAT_REPLY}, session.timing.silence_s)
                worst = max(worst, time.monotonic() - sent)
                time.sleep(session.timing.heartbeat_s)
            return f"5 replies, slowest {worst * 1000:.1f} ms"

    def check_answers_while_busy(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            session.send(MessageType.ACQUIRE, {"kind": "CBCT"})
            session.send(MessageType.GET_STATE)
            state = session.wait_for({MessageType.STATE}, budget.silence_s)
            session.send(MessageType.HEARTBEAT)
            session.wait_for({MessageType.HEARTBEAT_REPLY}, budget.silence_s)
            started = time.monotonic()
            images = session.wait_for({MessageType.IMAGES}, budget.limit_for("ACQUIRE") or 180)
            took = time.monotonic() - started
            progress = [
                float(f.body["elapsed_s"])
                for f in session.frames
                if f.type == MessageType.PROGRESS and f.body.get("operation") == "ACQUIRE"
            ]
            if took > budget.progress_interval_s * 1.5 and not progress:
                raise CheckFailed(f"no PROGRESS during a {took:.1f} s ACQUIRE")
            # From the start, between reports and to the answer: never longer than stated.
            gaps = [b - a for a, b in itertools.pairwise([0.0, *progress, took])]
            if max(gaps) > budget.progress_interval_s * 1.5 + 0.25:
                raise CheckFailed(
                    f"PROGRESS {max(gaps):.2f} s apart, stated {budget.progress_interval_s} s"
                )
            return (
                f"STATE busy={state.body.get('busy')!r} during ACQUIRE; {len(progress)} PROGRESS "
                f"in {took:.1f} s; {len(images.body['planes'])} planes"
            )

    def check_busy(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            session.send(MessageType.ACQUIRE, {"kind": "CBCT"})
            session.send(MessageType.MOVE_COUCH, TableTop(lateral_mm=0.5).as_body())
            refusal = session.wait_for({MessageType.ERROR, MessageType.COUCH_POSITION}, 10)
            if refusal.type != MessageType.ERROR or refusal.body.get("code") != "BUSY":
                raise CheckFailed(f"a second long operation got {refusal.type.name} {refusal.body}")
            if refusal.body.get("request") != "MOVE_COUCH":
                raise CheckFailed(f"ERROR BUSY names request {refusal.body.get('request')!r}")
            session.wait_for({MessageType.IMAGES}, budget.limit_for("ACQUIRE") or 180)
            return "ERROR BUSY for MOVE_COUCH during ACQUIRE, and the ACQUIRE still answered"

    def check_errors(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            session.send(MessageType.BEAM_ON)
            refused = session.wait_for({MessageType.ERROR, MessageType.BEAM_STARTED}, 10)
            if refused.type != MessageType.ERROR or refused.body.get("code") != "NOT_LOADED":
                raise CheckFailed(
                    f"BEAM_ON with nothing loaded got {refused.type.name} {refused.body}"
                )
            energies = session.hello.get("capabilities", {}).get("energies_mv") or [6.0]
            beam = _small_beam(session.hello, 2.0, energy=max(energies) + 91.0)
            session.send(MessageType.LOAD_BEAM, program_to_body(beam))
            limit = session.wait_for(
                {MessageType.ERROR, MessageType.LOADED}, budget.limit_for("LOAD_BEAM") or 120
            )
            if limit.type != MessageType.ERROR or limit.body.get("code") != "LIMIT":
                raise CheckFailed(
                    f"a {beam.energy_mv:g} MV beam got {limit.type.name} {limit.body}"
                )
            return f"NOT_LOADED for BEAM_ON; LIMIT for a {beam.energy_mv:g} MV beam"

    def check_control_points(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            beam = _small_beam(session.hello, 3.0, segments=3)
            session.start_beam(beam)
            session.wait_for({MessageType.BEAM_STARTED}, budget.silence_s)
            ended = session.wait_for({MessageType.BEAM_ENDED}, 120)
            reached = [f.body for f in session.frames if f.type == MessageType.CONTROL_POINT]
            indices = [int(body["index"]) for body in reached]
            if indices != [1, 2, 3]:
                raise CheckFailed(
                    f"CONTROL_POINT indices {indices} for control points 0..3, not [1, 2, 3]"
                )
            counts = [float(body["meterset"]) for body in reached]
            if any(b < a for a, b in itertools.pairwise(counts)):
                raise CheckFailed(f"CONTROL_POINT metersets fall: {counts}")
            if float(ended.body["meterset"]) + 1e-6 < counts[-1]:
                raise CheckFailed("BEAM_ENDED counts less than the last CONTROL_POINT")
            return f"indices {indices} at {counts} MU, BEAM_ENDED {ended.body['meterset']} MU"

    def check_couch(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            caps = session.hello.get("capabilities", {})
            turn = 0.4 if float(caps.get("couch_rotation_limits_deg") or 0) >= 0.6 else 0.0
            asked = TableTop(3.0, 12.0, -6.0, turn, turn * 0.75, turn * 0.5)  # no two alike
            session.send(MessageType.GET_STATE)
            before = TableTop.from_body(
                session.wait_for({MessageType.STATE}, budget.silence_s).body["couch"]
            )
            session.send(MessageType.MOVE_COUCH, asked.as_body())
            after = TableTop.from_body(
                session.wait_for(
                    {MessageType.COUCH_POSITION}, budget.limit_for("MOVE_COUCH") or 120
                ).body
            )
            tolerance = (
                float(caps.get("couch_tolerance_mm", 1.0)),
                float(caps.get("couch_tolerance_deg", 0.5)),
            )
            missed = misses(asked, after - before, *tolerance)
            if missed:
                raise CheckFailed(f"asked {asked.as_body()}, read back: {'; '.join(missed)}")
            session.send(MessageType.GET_STATE)
            state = TableTop.from_body(
                session.wait_for({MessageType.STATE}, budget.silence_s).body["couch"]
            )
            if misses(after, state, 0.01, 0.01):
                raise CheckFailed(f"STATE couch {state.as_body()} differs from COUCH_POSITION")
            return "each of the six axes read back as asked, within the stated tolerance"

    def check_images(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            session.send(MessageType.ACQUIRE, {"kind": "CBCT"})
            first = session.wait_for({MessageType.IMAGES}, budget.limit_for("ACQUIRE") or 180)
            try:
                assembly = ImageAssembly(first.body)
                while not assembly.complete:
                    assembly.add(session.wait_for({MessageType.IMAGES}, budget.silence_s).body)
            except DeviceError as exc:
                raise CheckFailed(str(exc)) from exc
            images = assembly.image_set()
            values = np.asarray(images.pixels)
            if values.min() < 0 or values.max() > 65535:
                raise CheckFailed("voxels outside uint16")
            fragments = sum(1 for f in session.frames if f.type == MessageType.IMAGES)
            return (
                f"{len(images.pixels)} planes of {values.shape[1]}x{values.shape[2]} in "
                f"{fragments} fragment(s), one geometry, planes in order"
            )

    def check_host_loss(self) -> str:
        with self._greeted() as session:  # the host vanishes with the beam on
            budget = session.timing
            beam = _small_beam(session.hello, 500.0, number=8)
            session.start_beam(beam)
            session.wait_for({MessageType.METERSET}, budget.silence_s + 5)
        time.sleep(3.0)  # longer than the 2 s a controller waits for a silent host
        with self._greeted() as again:
            last = again.hello.get("last_delivery") or {}
        if last.get("beam") != 8:
            raise CheckFailed(f"HELLO_REPLY last_delivery {last!r}, not beam 8")
        if not last.get("termination"):
            raise CheckFailed(f"the beam was still on 3 s after its host was lost: {last}")
        if last.get("termination") == "NORMAL" or float(last.get("measured", 0)) >= 500.0 - 1e-6:
            raise CheckFailed(f"the beam was finished without its host: {last}")
        if (last.get("termination"), last.get("code")) != ("MACHINE", "LINK"):
            raise CheckFailed(
                f"ended {last.get('termination')} {last.get('code')!r}, not MACHINE LINK"
            )
        return f"beam 8 stopped at {last['measured']} MU of 500, MACHINE LINK"

    def check_interrupt(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            beam = _small_beam(session.hello, 500.0)
            session.start_beam(beam)
            session.wait_for({MessageType.METERSET}, budget.silence_s + 5)
            asked = time.monotonic()
            session.send(MessageType.INTERRUPT, {"reason": "hil check"})
            ended = session.wait_for({MessageType.BEAM_ENDED}, 10)
            if ended.body["termination"] != "OPERATOR":
                raise CheckFailed(f"INTERRUPT ended the beam {ended.body['termination']}")
            return f"BEAM_ENDED OPERATOR {time.monotonic() - asked:.2f} s after INTERRUPT"

    def check_reconnect(self) -> str:
        with self._greeted() as session:  # the host vanishes with the beam on
            budget = session.timing
            beam = _small_beam(session.hello, 500.0, number=7)
            session.start_beam(beam)
            heard = float(
                session.wait_for({MessageType.METERSET}, budget.silence_s + 5).body["meterset"]
            )
        time.sleep(0.5)
        with self._greeted() as again:
            last = again.hello.get("last_delivery") or {}
        if last.get("beam") != 7 or not last.get("termination"):
            raise CheckFailed(f"HELLO_REPLY last_delivery {last!r}, not the ended beam 7")
        if float(last["measured"]) < heard:
            raise CheckFailed(f"last_delivery measured {last['measured']} < {heard} heard")
        return f"last_delivery beam 7 {last['termination']} at {last['measured']} MU"

    # -- the afterloader's checks (hil/PROTOCOL.md, Afterloader) ---------------------------

    def afterloader_checks(self) -> list[tuple[str, str, Callable[[], str]]]:
        """The checks of an afterloader: the Afterloader section's clauses, and the link's."""
        return [
            (
                "handshake and afterloader capabilities",
                "Versioning; HELLO_REPLY; Afterloader",
                self.check_afterloader_handshake,
            ),
            ("source status", "Afterloader (SOURCE_STATUS)", self.check_source_status),
            ("every message type", "Message types; Afterloader", self.check_afterloader_messages),
            ("NAK and retransmission", "Reliability", self.check_nak),
            ("heartbeat", "Reliability (Heartbeat)", self.check_heartbeat),
            (
                "refusals before the source moves",
                "Afterloader (LOAD_CHANNEL); Errors",
                self.check_channel_refusals,
            ),
            (
                "dwell numbering and measured times",
                "Afterloader (Treatment)",
                self.check_dwells,
            ),
            ("RETRACT during a channel", "Afterloader (RETRACT)", self.check_retract),
            (
                "source retracted when the host is lost",
                "Afterloader (Losing the host); Safety",
                self.check_afterloader_host_loss,
            ),
        ]

    def check_afterloader_handshake(self) -> str:
        with self._greeted() as session:
            body = session.hello
            if body.get("protocol") != PROTOCOL_VERSION:
                raise CheckFailed(
                    f"HELLO_REPLY protocol {body.get('protocol')!r}, not {PROTOCOL_VERSION}"
                )
            if body.get("machine") != "afterloader":
                raise CheckFailed(f"HELLO_REPLY machine {body.get('machine')!r}")
            caps = body.get("capabilities", {})
            missing = [k for k in AFTERLOADER_CAPABILITIES if k not in caps]
            if missing:
                raise CheckFailed(f"HELLO_REPLY capabilities lack {', '.join(missing)}")
            if float(caps["min_dwell_s"]) > float(caps["max_dwell_s"]):
                raise CheckFailed(f"min_dwell_s {caps['min_dwell_s']} > max_dwell_s")
            if "last_channel" not in body or "timing" not in body:
                raise CheckFailed("HELLO_REPLY states no last_channel or no timing")
            identity = body["identity"]
            return (
                f"{identity['vendor']} {identity['model']} {identity['serial']}: "
                f"{caps['channels']} channels up to {caps['max_channel_length_mm']:g} mm, dwells "
                f"{caps['min_dwell_s']:g}..{caps['max_dwell_s']:g} s, "
                f"{caps['max_dwells_per_channel']} a channel"
            )

    def check_source_status(self) -> str:
        with self._greeted() as session:
            body = session.source_status()
            try:
                reference = local_datetime(str(body["reference_datetime"]))
            except ValueError as exc:
                raise CheckFailed(f"reference_datetime: {exc}") from exc
            if body["source_position"] != "safe":
                raise CheckFailed("the source is out with no channel treated")
            return (
                f"{body['isotope']} {body['reference_air_kerma_rate']:g} µGy/h at 1 m on "
                f"{reference:%Y-%m-%d %H:%M}, half-life {body['half_life_days']:g} d; source "
                f"{body['source_position']}, door {body['door']}"
            )

    def check_afterloader_messages(self) -> str:
        with self._greeted() as session:
            session.send(MessageType.HEARTBEAT)
            session.wait_for({MessageType.HEARTBEAT_REPLY}, session.timing.silence_s)
            session.source_status()
            _, _, ended = session.run_channel(_channel(session.hello, 1, 1, 1.0))
            if ended.body["termination"] != "NORMAL":
                raise CheckFailed(f"a one-dwell channel ended {ended.body['termination']}")
            seen = {f.type for f in session.frames}
            missing = sorted(k.name for k in AFTERLOADER_REPLIES - seen)
            if missing:
                raise CheckFailed(f"no {', '.join(missing)} during a one-dwell channel")
            return (
                f"{len(session.frames)} frames of {len(seen)} types, every body follows its schema"
            )

    def check_channel_refusals(self) -> str:
        with self._greeted() as session:
            budget, caps = session.timing, session.hello.get("capabilities", {})
            too_long = float(caps.get("max_dwell_s") or 600.0) + 60.0
            sound = _channel(session.hello, 1, 1, 1.0)
            programme = ChannelProgramme(
                1, sound.length_mm, (sound.dwells[0], Dwell(1, 10.0, too_long))
            )
            refusals = []
            for bad, what in (
                (programme, f"a {too_long:g} s dwell"),
                (_channel(session.hello, int(caps.get("channels") or 1) + 1, 1, 1.0), "a channel"),
            ):
                session.send(MessageType.LOAD_CHANNEL, channel_to_body(bad))
                refusal = session.wait_for(
                    {MessageType.ERROR, MessageType.LOADED}, budget.silence_s
                )
                if refusal.type != MessageType.ERROR or refusal.body.get("code") != "LIMIT":
                    raise CheckFailed(
                        f"LOAD_CHANNEL of {what} got {refusal.type.name} {refusal.body}"
                    )
                if refusal.body.get("request") != "LOAD_CHANNEL":
                    raise CheckFailed(f"ERROR LIMIT names request {refusal.body.get('request')!r}")
                refusals.append(what)
            session.send(MessageType.TREAT)
            treat = session.wait_for({MessageType.ERROR, MessageType.CHANNEL_STARTED}, 10)
            if treat.type != MessageType.ERROR or treat.body.get("code") != "NOT_LOADED":
                raise CheckFailed(f"TREAT after refused loads got {treat.type.name} {treat.body}")
            if session.source_status()["source_position"] != "safe":
                raise CheckFailed("the source left its safe after refused loads")
            session.send(MessageType.GET_STATE)
            other = session.wait_for({MessageType.ERROR, MessageType.STATE}, budget.silence_s)
            if other.type != MessageType.ERROR or other.body.get("code") != "UNSUPPORTED":
                raise CheckFailed(f"a linac's GET_STATE got {other.type.name} {other.body}")
            return (
                f"LIMIT for {' and for '.join(refusals)} beyond channel {caps.get('channels')}; "
                "then NOT_LOADED for TREAT, the source safe; UNSUPPORTED for GET_STATE"
            )

    def check_dwells(self) -> str:
        with self._greeted() as session:
            programme = _channel(session.hello, 2, 3, 1.0)
            loaded, started, ended = session.run_channel(programme)
            said = (loaded.get("channel"), loaded.get("dwells"), float(loaded.get("total_s", -1)))
            if said != (programme.channel, len(programme.dwells), programme.total_s):
                raise CheckFailed(
                    f"LOADED {loaded} for channel 2 of 3 dwells, {programme.total_s} s"
                )
            for frame in (started, ended):
                if frame.body.get("treatment") != loaded["treatment"]:
                    raise CheckFailed(
                        f"{frame.type.name} treatment {frame.body.get('treatment')}, LOADED "
                        f"said {loaded['treatment']}"
                    )
            if ended.body["termination"] != "NORMAL":
                raise CheckFailed(f"the channel ended {ended.body['termination']} {ended.body}")
            done = [f.body for f in session.frames if f.type == MessageType.DWELL_DONE]
            indices = [int(d["index"]) for d in done]
            if indices != [0, 1, 2]:
                raise CheckFailed(f"DWELL_DONE indices {indices} for dwells 0..2, not [0, 1, 2]")
            for body, dwell in zip(done, programme.dwells, strict=True):
                if abs(float(body["position_mm"]) - dwell.position_mm) > 0.5:
                    raise CheckFailed(
                        f"DWELL_DONE {dwell.index} at {body['position_mm']} mm, loaded at "
                        f"{dwell.position_mm:g} mm"
                    )
                if abs(float(body["delivered_s"]) - dwell.time_s) > 0.1 + 0.01 * dwell.time_s:
                    raise CheckFailed(
                        f"DWELL_DONE {dwell.index} measured {body['delivered_s']} s of "
                        f"{dwell.time_s:g} s, yet the channel ended NORMAL"
                    )
            measured = [float(d["delivered_s"]) for d in done]
            total = float(ended.body["delivered_s"])
            if abs(sum(measured) - total) > 0.1:
                raise CheckFailed(
                    f"DWELL_DONE seconds {measured} sum to {sum(measured):g}, CHANNEL_ENDED "
                    f"says {total:g}"
                )
            at = [i for i, f in enumerate(session.frames) if f.type == MessageType.DWELL_PROGRESS]
            counts = [float(session.frames[i].body["delivered_s"]) for i in at]
            if any(b < a for a, b in itertools.pairwise(counts)) or max(counts) > total + 1e-6:
                raise CheckFailed(f"DWELL_PROGRESS falls or passes CHANNEL_ENDED: {counts}")
            count, summed = 0.0, 0.0  # each DWELL_DONE after a DWELL_PROGRESS counting it
            for frame in session.frames:
                if frame.type == MessageType.DWELL_PROGRESS:
                    count = float(frame.body["delivered_s"])
                elif frame.type == MessageType.DWELL_DONE:
                    summed += float(frame.body["delivered_s"])
                    if count < summed - 0.05:
                        raise CheckFailed(
                            f"DWELL_DONE {frame.body['index']} came when DWELL_PROGRESS had "
                            f"counted {count:g} s of the {summed:g} s done"
                        )
            first = session.frames.index(started)
            times = [session.arrived[first]] + [session.arrived[i] for i in at]
            times.append(session.arrived[session.frames.index(ended)])
            gap = max(b - a for a, b in itertools.pairwise(times))
            if gap > session.timing.tick_s * 1.5 + 0.25:
                raise CheckFailed(
                    f"DWELL_PROGRESS {gap:.2f} s apart, stated tick_s {session.timing.tick_s}"
                )
            return (
                f"DWELL_DONE {indices} measuring {measured} s, sum {sum(measured):g} s, "
                f"CHANNEL_ENDED NORMAL {total:g} s; {len(counts)} DWELL_PROGRESS at most "
                f"{gap:.2f} s apart"
            )

    def check_retract(self) -> str:
        with self._greeted() as session:
            programme = _channel(session.hello, 3, 1, 600.0)
            session.start_channel(programme)
            heard, _ = session.until_delivering()
            asked = time.monotonic()
            session.send(MessageType.RETRACT, {"reason": "hil check"})
            ended = session.wait_for({MessageType.CHANNEL_ENDED}, 10).body
            took = time.monotonic() - asked
            if ended["termination"] != "OPERATOR" or ended["reason"] != "hil check":
                raise CheckFailed(f"RETRACT ended the channel {ended}")
            delivered = float(ended["delivered_s"])
            if not heard - 1e-6 <= delivered < programme.total_s:
                raise CheckFailed(
                    f"{delivered:g} s after {heard:g} s were heard, of {programme.total_s:g}"
                )
            if session.source_status()["source_position"] != "safe":
                raise CheckFailed("SOURCE_STATUS says the source is out after CHANNEL_ENDED")
            return (
                f"CHANNEL_ENDED OPERATOR at {delivered:g} s of {programme.total_s:g}, "
                f"{took:.2f} s after RETRACT; the source safe"
            )

    def check_afterloader_host_loss(self) -> str:
        """The host vanishes with the source out. The source must come back within the 2 s a
        controller waits for a silent host (its retries, 1.2 s, may end it sooner): told
        apart from one that waits for the next HELLO by the seconds it counted meanwhile, at
        the rate its DWELL_PROGRESS counted before."""
        with self._greeted() as session:
            programme = _channel(session.hello, 4, 1, 600.0)
            treatment = int(session.start_channel(programme).body["treatment"])
            first, since = session.until_delivering()
            heard, last = first, since
            while last - since < 2.0 or heard <= first:
                frame = session.wait_for({MessageType.DWELL_PROGRESS}, 10)
                heard, last = float(frame.body["delivered_s"]), time.monotonic()
            rate = (heard - first) / (last - since)  # source seconds a wall-clock second
        time.sleep(7.0)
        with self._greeted() as again:
            ended = again.hello.get("last_channel") or {}
        if ended.get("treatment") != treatment:
            raise CheckFailed(f"HELLO_REPLY last_channel {ended!r}, not treatment {treatment}")
        if (ended.get("termination"), ended.get("code")) != ("MACHINE", "LINK"):
            raise CheckFailed(
                f"ended {ended.get('termination')} {ended.get('code')!r}, not MACHINE LINK"
            )
        delivered = float(ended["delivered_s"])
        if delivered < heard - 1e-6:
            raise CheckFailed(f"last_channel counts {delivered:g} s, {heard:g} s were heard")
        out = (delivered - heard) / rate
        if delivered >= programme.total_s - 1e-6 or delivered > heard + 4.5 * rate + 1.0:
            raise CheckFailed(
                f"the source stayed out about {out:.1f} s after its host went silent "
                f"({delivered:g} s counted, {heard:g} s heard): not retracted at once"
            )
        return (
            f"treatment {treatment} ended MACHINE LINK at {delivered:g} s of "
            f"{programme.total_s:g}, about {max(out, 0.0):.1f} s after the host's last frame"
        )


def write_junit(results: list[CheckResult], path: Path, device: str) -> Path:
    failures = sum(not r.ok for r in results)
    total = sum(r.seconds for r in results)
    suite = ET.Element(
        "testsuite",
        name=f"tdw-emu hil check {device}",
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        time=f"{total:.2f}",
    )
    for result in results:
        case = ET.SubElement(
            suite, "testcase", classname="hil.PROTOCOL", name=result.name, time=str(result.seconds)
        )
        if not result.ok:
            failure = ET.SubElement(case, "failure", message=f"PROTOCOL.md {result.clause}")
            failure.text = result.detail
        else:
            ET.SubElement(case, "system-out").text = result.detail
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
    return path
