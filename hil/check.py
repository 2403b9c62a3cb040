"""``tdw-emu hil check --device URL``: protocol v1 conformance of a real controller.

Each check drives the controller through one clause of ``hil/PROTOCOL.md`` on its own link
(every body checked against ``hil/schemas``) and names the clause it judged, so a firmware
engineer reading a failure knows which paragraph the controller broke. The beams it asks
for are small (a few MU at the lowest dose rate the controller allows) and start with the
gantry where it is.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from devices import schemas
from devices.base import BeamProgram, ControlPointProgram
from devices.link import Link, LinkLost
from devices.protocol import Frame, MessageType
from devices.remote import link_opener, program_to_body
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
        self.timing = TimingBudget()
        self.hello: dict = {}

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
            broken = schemas.problems(frame.type, frame.body)
            if broken:
                raise CheckFailed(f"{frame.type.name} breaks hil/schemas: {broken[0]}")
            if frame.type in kinds:
                return frame
            if frame.type == MessageType.ERROR and MessageType.ERROR not in kinds:
                raise CheckFailed(f"ERROR {frame.body}")
        names = ", ".join(sorted(k.name for k in kinds))
        raise CheckFailed(f"no {names} within {seconds:g} s")

    def handshake(self) -> dict:
        self.send(MessageType.HELLO, {"protocol": 1})
        reply = self.wait_for({MessageType.HELLO_REPLY}, TimingBudget().hello_s)
        self.hello = reply.body
        self.timing = TimingBudget.from_body(reply.body.get("timing"))
        return reply.body


def _small_beam(hello: dict, meterset: float, number: int = 1) -> BeamProgram:
    caps = hello.get("capabilities", {})
    energy = float((caps.get("energies_mv") or [6.0])[0])
    rate = float(caps.get("min_dose_rate") or 100.0)
    pairs = int(caps.get("mlc_leaf_pairs") or 0)
    mlc = tuple([-10.0] * pairs + [10.0] * pairs)
    points = tuple(
        ControlPointProgram(i, meterset * i, 0.0, 0.0, (-50.0, 50.0, -50.0, 50.0), mlc)
        for i in (0, 1)
    )
    return BeamProgram(number, "HILCHECK", energy, rate, meterset, points)


class ControllerCheck:
    """The checks of PROTOCOL.md, in order; ``run`` returns one result each."""

    def __init__(self, spec: str) -> None:
        self.opener, _ = link_opener(spec)
        self.results: list[CheckResult] = []

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

    def run(self) -> list[CheckResult]:
        checks = [
            ("handshake and version", "Message types; Versioning", self.check_handshake),
            ("every message type", "Message types", self.check_messages),
            ("NAK and retransmission", "Reliability", self.check_nak),
            ("heartbeat", "Reliability (Heartbeat)", self.check_heartbeat),
            ("answers while moving", "Timing", self.check_answers_while_busy),
            ("interrupt during a beam", "Controller states", self.check_interrupt),
            ("reconnect with last_delivery", "Safety rules on the host", self.check_reconnect),
        ]
        for name, clause, check in checks:
            self._run_one(name, clause, check)
        return self.results

    # -- the checks ------------------------------------------------------------------------

    def check_handshake(self) -> str:
        with self._greeted() as session:
            body = session.hello
            if body.get("protocol") != 1:
                raise CheckFailed(f"HELLO_REPLY protocol {body.get('protocol')!r}, not 1")
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
            session.send(MessageType.LOAD_BEAM, program_to_body(beam))
            session.wait_for({MessageType.LOADED}, budget.limit_for("LOAD_BEAM") or 120)
            session.send(MessageType.BEAM_ON)
            session.wait_for({MessageType.BEAM_STARTED}, budget.silence_s)
            ended = session.wait_for({MessageType.BEAM_ENDED}, 120)
            if ended.body["termination"] != "NORMAL":
                raise CheckFailed(f"a 2 MU beam ended {ended.body['termination']}")
            seen = {f.type for f in session.frames}
            if MessageType.METERSET not in seen:
                raise CheckFailed("no METERSET during the beam")
            session.send(
                MessageType.MOVE_COUCH, {"translation": [0.5, 0, 0], "rotation": [0, 0, 0]}
            )
            session.wait_for({MessageType.COUCH_POSITION}, budget.limit_for("MOVE_COUCH") or 120)
            return f"{len(session.frames)} frames, every body follows its schema"

    def check_nak(self) -> str:
        with self._greeted() as session:
            naks = session.link.counters.naks_received
            session.link.transport.write(b"\x05\x01\x02\x03\x04\x00")  # a frame that fails COBS/CRC
            session.send(MessageType.HEARTBEAT)  # and the next one must still get through
            session.wait_for({MessageType.HEARTBEAT_REPLY}, session.timing.silence_s)
            if session.link.counters.naks_received <= naks:
                raise CheckFailed("a garbled frame was not answered with NAK")
            return "garbled frame NAKed, the next frame acknowledged and answered"

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
            gaps = [b - a for a, b in itertools.pairwise(progress)]
            if took > budget.progress_interval_s * 1.5 and not progress:
                raise CheckFailed(f"no PROGRESS during a {took:.1f} s ACQUIRE")
            if gaps and max(gaps) > budget.progress_interval_s * 1.5:
                raise CheckFailed(
                    f"PROGRESS {max(gaps):.2f} s apart, stated {budget.progress_interval_s} s"
                )
            return (
                f"STATE busy={state.body.get('busy')!r} during ACQUIRE; {len(progress)} PROGRESS "
                f"in {took:.1f} s; {len(images.body['planes'])} planes"
            )

    def check_interrupt(self) -> str:
        with self._greeted() as session:
            budget = session.timing
            beam = _small_beam(session.hello, 500.0)
            session.send(MessageType.LOAD_BEAM, program_to_body(beam))
            session.wait_for({MessageType.LOADED}, budget.limit_for("LOAD_BEAM") or 120)
            session.send(MessageType.BEAM_ON)
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
            session.send(MessageType.LOAD_BEAM, program_to_body(beam))
            session.wait_for({MessageType.LOADED}, budget.limit_for("LOAD_BEAM") or 120)
            session.send(MessageType.BEAM_ON)
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
