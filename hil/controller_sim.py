"""The controller side of protocol v1, on a real pty or a TCP socket.

The machine itself is devices.sim.linac.SimulatedLinac (device logic); this module is only
the protocol interface in front of it, plus the faults of hil.faults. Its timing is the
linac's: axis speeds and dose rate at the configured time scale.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading
import time
from dataclasses import asdict

from devices.base import (
    BeamEnded,
    BeamProgram,
    ControlPointProgram,
    ControlPointReached,
    CouchCorrection,
    DeviceError,
    MetersetTick,
)
from devices.clock import Clock
from devices.link import FdTransport, Link, LinkLost, SocketTransport
from devices.protocol import MessageType
from devices.sim.linac import SimulatedLinac, load_machine_profile
from devices.timing import TimingBudget
from hil.faults import Faults, FaultyTransport


def program_from_body(body: dict) -> BeamProgram:
    points = tuple(
        ControlPointProgram(
            int(cp["index"]),
            float(cp["cumulative_meterset"]),
            float(cp["gantry_angle"]),
            float(cp.get("collimator_angle", 0.0)),
            tuple(cp.get("jaws", (0, 0, 0, 0))),
            tuple(cp.get("mlc", ())),
        )
        for cp in body["control_points"]
    )
    return BeamProgram(
        int(body["beam_number"]),
        str(body["name"]),
        float(body["energy_mv"]),
        float(body["dose_rate"]),
        float(body["total_meterset"]),
        points,
        float(body.get("start_meterset", 0.0)),
        None if body.get("end_meterset") is None else float(body["end_meterset"]),
    )


# The longest each long operation takes on the simulated linac, in device seconds: a full
# gantry turn (LOAD_BEAM), the couch across its range (MOVE_COUCH), a CBCT rotation.
def _device_seconds(profile: dict) -> dict[str, float]:
    axes = profile.get("axes", {})
    gantry = 360.0 / float(axes.get("gantry_speed_deg_s", 6.0))
    couch = 2 * float(axes.get("couch_limits_mm", 50.0)) / float(axes.get("couch_speed_mm_s", 20))
    return {"LOAD_BEAM": gantry, "MOVE_COUCH": couch * 2, "ACQUIRE": 60.0}


LONG_REPLIES = {
    MessageType.LOAD_BEAM: MessageType.LOADED,
    MessageType.MOVE_COUCH: MessageType.COUCH_POSITION,
    MessageType.ACQUIRE: MessageType.IMAGES,
}


# Deliberately broken variants, for proving that `tdw-emu hil check` catches what it claims
# to: each breaks one clause of hil/PROTOCOL.md.
QUIRKS = {
    "no-progress": "sends no PROGRESS while busy (Timing)",
    "silent-while-busy": "answers nothing while a long operation runs (Timing)",
    "forgets-last-delivery": "reports no last_delivery after a lost host (Safety rules)",
}


class ControllerSim:
    def __init__(
        self,
        machine: str = "linac",
        time_scale: float = 1.0,
        faults: Faults | None = None,
        quirks: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(quirks) - set(QUIRKS)
        if unknown:
            raise ValueError(
                f"unknown controller quirk(s) {sorted(unknown)}; known: {sorted(QUIRKS)}"
            )
        self.quirks = frozenset(quirks)
        self.profile = load_machine_profile(machine)
        self.clock = Clock(time_scale)
        # What this controller promises in HELLO_REPLY (hil/PROTOCOL.md, Timing): PROGRESS
        # every second while busy, and each long operation's worst case at this time scale,
        # doubled, plus 5 s for the link.
        self.timing = TimingBudget(
            max_s={
                op: round(2 * seconds * time_scale + 5.0, 1)
                for op, seconds in _device_seconds(self.profile).items()
            }
        )
        self._busy: threading.Thread | None = None
        self._busy_operation = ""
        self._busy_session = 0
        self.faults = faults or Faults()
        self.linac = SimulatedLinac(self.profile, self.clock)
        self.linac.connect()
        self._delivery: threading.Thread | None = None
        self.sessions = 0
        # Per beam, the last meterset whose frame the host acknowledged: no record may
        # ever report more than this (the fault matrix checks it).
        self.acknowledged: dict[int, float] = {}
        # Per beam, the last meterset the machine measured and put on the line. A frame
        # can reach the host and its ACK be lost (a stall, a dropped line), so the host
        # may hold more than ``acknowledged`` but never more than this.
        self.sent: dict[int, float] = {}
        self._beam_number = 0
        # Every beam-on in order, as the machine measured it: a rig's ground truth, read
        # through the control channel, to hold the host's records against after a crash.
        self.deliveries: list[dict] = []

    def report(self) -> dict:
        """For the control channel's status: sessions served and every beam-on so far."""
        return {"sessions": self.sessions, "deliveries": [dict(d) for d in self.deliveries]}

    def _hello_body(self) -> dict:
        caps = asdict(self.linac.capabilities())
        last = dict(self.deliveries[-1]) if self.deliveries else None
        if "forgets-last-delivery" in self.quirks:
            last = None
        return {
            "protocol": 1,
            "identity": asdict(self.linac.identify()),
            "capabilities": caps,
            "timing": self.timing.as_body(),
            "last_delivery": last,
        }

    def _measure(self, event) -> None:
        """What the machine delivered, whether or not the host ever hears of it."""
        if isinstance(event, MetersetTick):
            self.sent[self._beam_number] = event.meterset
            self.deliveries[-1]["measured"] = event.meterset
        elif isinstance(event, BeamEnded):
            self.sent[self._beam_number] = event.meterset
            self.deliveries[-1].update(measured=event.meterset, termination=event.termination.value)

    def _deliver(self, link: Link) -> None:
        events = self.linac.beam_on()
        try:
            for event in events:
                while self.faults.stalled:
                    time.sleep(0.05)
                self._measure(event)
                if isinstance(event, MetersetTick):
                    link.send(
                        MessageType.METERSET,
                        {"meterset": event.meterset, "dose_rate": event.dose_rate},
                    )
                    self.acknowledged[self._beam_number] = event.meterset  # send() got its ACK
                elif isinstance(event, ControlPointReached):
                    link.send(
                        MessageType.CONTROL_POINT,
                        {
                            "index": event.index,
                            "meterset": event.meterset,
                            "gantry": event.gantry_angle,
                        },
                    )
                elif isinstance(event, BeamEnded):
                    link.send(
                        MessageType.BEAM_ENDED,
                        {
                            "meterset": event.meterset,
                            "termination": event.termination.value,
                            "reason": event.reason,
                            "code": event.interlock_code,
                        },
                    )
                    self.acknowledged[self._beam_number] = event.meterset
        except LinkLost:
            # A controller that loses its host holds the beam, and counts it to the end.
            self.linac.interrupt("link lost")
            for event in events:
                self._measure(event)

    def _abort_delivery(self) -> None:
        if self._delivery is not None and self._delivery.is_alive():
            self.linac.interrupt("host link lost")
            self._delivery.join(timeout=5)

    def handle(self, link: Link, kind: MessageType, body: dict) -> None:
        """Answers one request. A long operation (LOAD_BEAM, MOVE_COUCH, ACQUIRE) runs on a
        worker that reports PROGRESS, so HELLO, HEARTBEAT, GET_STATE and INTERRUPT are
        answered meanwhile; a second long operation while one runs gets ERROR BUSY."""
        try:
            if kind in LONG_REPLIES:
                self._start_long(link, kind, body)
            elif kind == MessageType.HELLO:
                self._abort_delivery()
                self.sessions += 1
                link.send(MessageType.HELLO_REPLY, self._hello_body())
            elif kind == MessageType.BEAM_ON:
                start = self.sent.get(self._beam_number, 0.0)
                beam = {"beam": self._beam_number, "start": start, "measured": start}
                self.deliveries.append({**beam, "termination": ""})
                link.send(
                    MessageType.BEAM_STARTED, {"beam": self._beam_number, "start_meterset": start}
                )
                self._delivery = threading.Thread(target=self._deliver, args=(link,), daemon=True)
                self._delivery.start()
            elif kind == MessageType.INTERRUPT:
                self.linac.interrupt(str(body.get("reason", "")))
            elif kind == MessageType.GET_STATE:
                state = asdict(self.linac.axes())
                state["beam_on"] = self._delivery is not None and self._delivery.is_alive()
                state["busy"] = self._busy_operation if self._is_busy() else ""
                link.send(MessageType.STATE, state)
            elif kind == MessageType.HEARTBEAT:
                state = "busy" if self._is_busy() else "idle"
                if self._delivery is not None and self._delivery.is_alive():
                    state = "beam_on"
                link.send(MessageType.HEARTBEAT_REPLY, {"state": state, "sessions": self.sessions})
        except DeviceError as exc:
            link.send(MessageType.ERROR, {"code": "LIMIT", "text": str(exc)})

    def _is_busy(self) -> bool:
        return self._busy is not None and self._busy.is_alive()

    def _start_long(self, link: Link, kind: MessageType, body: dict) -> None:
        """One long operation at a time per host session. One left running by an earlier
        session (the host reconnected and asked again) is finished first, not refused."""
        if self._is_busy() and self._busy_session == self.sessions:
            link.send(
                MessageType.ERROR,
                {"code": "BUSY", "text": f"{self._busy_operation} is still in progress"},
            )
            return
        previous = self._busy
        self._busy_operation, self._busy_session = kind.name, self.sessions
        self._busy = threading.Thread(
            target=self._run_long, args=(link, kind, body, self.sessions, previous), daemon=True
        )
        self._busy.start()

    def _run_long(
        self,
        link: Link,
        kind: MessageType,
        body: dict,
        session: int,
        previous: threading.Thread | None = None,
    ) -> None:
        """Performs the operation while a ticker sends PROGRESS at the stated cadence; the
        answer (or ERROR) goes out only if the host's session is still the one that asked."""
        done = threading.Event()
        started = time.monotonic()

        def tick() -> None:
            while not done.wait(self.timing.progress_interval_s):
                if self.faults.stalled or session != self.sessions or "no-progress" in self.quirks:
                    continue
                elapsed = round(time.monotonic() - started, 3)
                with contextlib.suppress(LinkLost):
                    link.send(MessageType.PROGRESS, {"operation": kind.name, "elapsed_s": elapsed})

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        if previous is not None:
            previous.join()  # the machine does one motion at a time
        try:
            reply = self._perform_long(kind, body)
            answer = (LONG_REPLIES[kind], reply)
        except DeviceError as exc:
            answer = (MessageType.ERROR, {"code": "LIMIT", "text": str(exc)})
        finally:
            done.set()
        ticker.join(timeout=2)
        while self.faults.stalled:
            time.sleep(0.05)
        if session == self.sessions:
            with contextlib.suppress(LinkLost):
                link.send(*answer)

    def _perform_long(self, kind: MessageType, body: dict) -> dict:
        if kind == MessageType.LOAD_BEAM:
            program = program_from_body(body)
            self.linac.interlocks = dict(self.faults.interlocks)
            self.linac.axis_faults = dict(self.faults.axis_faults)
            self.linac.load_beam(program)
            self._beam_number = program.beam_number
            self.acknowledged[program.beam_number] = program.start_meterset
            self.sent[program.beam_number] = program.start_meterset
            return {"beam": program.beam_number}
        if kind == MessageType.MOVE_COUCH:
            position = self.linac.move_couch(
                CouchCorrection(tuple(body["translation"]), tuple(body.get("rotation", (0, 0, 0))))
            )
            return asdict(position)
        images = self.linac.acquire(str(body["kind"]))
        return {
            "kind": images.kind,
            "shape": list(images.pixels[0].shape),
            "planes": [base64.b64encode(p.astype("<u2").tobytes()).decode() for p in images.pixels],
            "pixel_spacing": images.pixel_spacing,
            "slice_spacing": images.slice_spacing,
            "origin": list(images.origin),
        }

    def serve(self, transport) -> None:
        """Serves one connection until it closes (or a drop fault closes it)."""
        link = Link(FaultyTransport(transport, self.faults))
        try:
            while not link.closed.is_set():
                if self.faults.drop_requested:
                    self.faults.drop_requested = False
                    self.faults.count("dropped")
                    break
                frame = link.recv(timeout=0.05) if not link.closed.is_set() else None
                deaf = "silent-while-busy" in self.quirks and self._is_busy()
                if frame is not None and not self.faults.stalled and not deaf:
                    self.handle(link, frame.type, frame.body)
        except LinkLost:
            pass
        finally:
            # The link goes first: after a drop the host hears nothing more, as on a real
            # cut cable. Then the controller holds its own beam.
            link.close()
            self._abort_delivery()

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
        """Binds the controller's TCP port (raises OSError, e.g. when it is taken)."""
        server = socket.create_server((host, port))
        self.address = server.getsockname()[:2]
        return server

    def serve_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ready: threading.Event | None = None,
        server: socket.socket | None = None,
    ) -> None:
        """Accepts one host at a time, again after every drop, until the process ends."""
        server = server or self.listen_tcp(host, port)
        if ready:
            ready.set()
        while True:
            conn, _ = server.accept()
            self.serve(SocketTransport(conn))

    def open_pty(self) -> tuple[int, str]:
        """A pty pair; the host opens the returned slave path, we keep the master."""
        master, slave = os.openpty()
        path = os.ttyname(slave)
        self._slave_fd = slave  # kept open so the line survives host reconnects
        return master, path

    def serve_pty(self, master: int) -> None:
        """Serves the pty master for good; after a dropped session the line stays up."""
        line = KeepOpen(FdTransport(master))
        while True:
            self.serve(line)
            time.sleep(0.05)


class KeepOpen:
    """A transport whose close() leaves the line up: a pty outlives each link session."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def read(self, size: int) -> bytes:
        return self.inner.read(size)

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    def close(self) -> None:
        pass
