"""The controller side of protocol v2 (hil/PROTOCOL.md), on a real pty or a TCP socket.

The machine itself is devices.sim.linac.SimulatedLinac (device logic); this module is only
the protocol interface in front of it, plus the faults of hil.faults. Its timing is the
linac's: axis speeds and dose rate at the configured time scale. The host tells it, through
the control channel, whose anatomy lies on the couch (``place_patient``), so its CBCT
images the patient being treated, not a bench phantom.

A machine profile of kind ``afterloader`` (``--machine afterloader``) gets the afterloader
controller of hil/afterloader_sim.py instead, on the same serving code.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading
import time
from dataclasses import asdict, replace

import numpy as np

from devices.base import (
    BeamEnded,
    BeamProgram,
    ControlPointProgram,
    ControlPointReached,
    DeviceError,
    ImageSet,
    MetersetTick,
)
from devices.clock import Clock
from devices.couch_axes import TableTop
from devices.geometry import volume_from_body
from devices.link import FdTransport, Link, LinkLost, SocketTransport
from devices.protocol import PROTOCOL_VERSION, MessageType
from devices.sim.linac import SimulatedLinac, load_machine_profile
from devices.timing import TimingBudget
from hil.faults import Faults, FaultyTransport


def images_bodies(images: ImageSet) -> list[dict]:
    """An ImageSet as IMAGES fragments (hil/PROTOCOL.md, Images): uint16 HU + 1024, as many
    whole planes to a frame as fit in 1 MiB."""
    planes = [
        base64.b64encode(np.asarray(p).astype("<u2").tobytes()).decode() for p in images.pixels
    ]
    rows, columns = np.asarray(images.pixels[0]).shape
    per_frame = max(1, (MAX_PLANE_BYTES - 4096) // (len(planes[0]) + 4))
    geometry = {
        "kind": images.kind,
        "encoding": "uint16le-hu1024",
        "rows": int(rows),
        "columns": int(columns),
        "planes_total": len(planes),
        "pixel_spacing": images.pixel_spacing,
        "slice_spacing": images.slice_spacing,
        "origin": [float(v) for v in images.origin],
    }
    return [
        {**geometry, "first_plane": first, "planes": planes[first : first + per_frame]}
        for first in range(0, len(planes), per_frame)
    ]


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
MAX_PLANE_BYTES = 1 << 20  # an IMAGES body holds whole planes up to the 1 MiB frame limit
HOST_SILENCE_S = 2.0  # with a beam on, nothing from the host for this long: the host is lost
# The afterloader's requests: a linac answers them ERROR UNSUPPORTED (hil/PROTOCOL.md, Errors).
AFTERLOADER_REQUESTS = (
    MessageType.GET_SOURCE_STATUS,
    MessageType.LOAD_CHANNEL,
    MessageType.TREAT,
    MessageType.RETRACT,
)


# Deliberately broken variants, for proving that `tdw-emu hil check` catches what it claims
# to: each breaks one clause of hil/PROTOCOL.md.
QUIRKS = {
    "no-progress": "sends no PROGRESS while busy (Timing)",
    "slow-progress": "sends PROGRESS three times less often than it states (Timing)",
    "silent-while-busy": "answers nothing while a long operation runs (Timing)",
    "forgets-last-delivery": "reports no last_delivery after a lost host (Safety)",
    "no-busy": "takes a second long operation while one runs (Timing)",
    "no-limit": "takes a beam outside its capabilities (Errors)",
    "cp-from-zero": "numbers CONTROL_POINT from 0 (Delivery)",
    "swapped-couch": "drives the longitudinal motor by vertical_mm and back (Couch)",
    "images-one-short": "states one plane more than it sends (Images)",
    "finishes-after-host-loss": "finishes the beam after it lost the host (Safety)",
}


class ControllerSim:
    """The simulated controller of one machine. Built with an afterloader's profile
    (``ControllerSim("afterloader", ...)``, as ``--machine afterloader`` does), it is a
    :class:`hil.afterloader_sim.AfterloaderControllerSim`."""

    def __new__(cls, machine: str = "linac", *args, **kwargs) -> ControllerSim:
        if cls is ControllerSim and load_machine_profile(machine).get("kind") == "afterloader":
            from hil.afterloader_sim import AfterloaderControllerSim

            return super().__new__(AfterloaderControllerSim)
        return super().__new__(cls)

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
        self._answering: threading.Thread | None = None  # the operation done, its answer going
        self._busy_operation = ""
        self._busy_session = 0
        self.faults = faults or Faults()
        self.linac = SimulatedLinac(self.profile, self.clock)
        self.linac.connect()
        self._delivery: threading.Thread | None = None
        self._loaded = False
        # The share done of the long operation running, as the machine reports it.
        self._done: dict[str, float] = {}
        self.linac.watch_progress(self._done.__setitem__)
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
            "protocol": PROTOCOL_VERSION,
            "machine": "linac",
            "identity": asdict(self.linac.identify()),
            "capabilities": caps,
            "timing": self.timing.as_body(),
            "last_delivery": last,
            "couch": self._couch_body(self.linac.couch_position()),
        }

    def _couch_body(self, position: TableTop) -> dict:
        """The table top as this controller reports it: its encoders, as they are."""
        return position.as_body()

    def place_patient(self, command: dict) -> dict:
        """The control channel's ``place_patient``: the anatomy to image from now on."""
        self.linac.place_patient(
            volume_from_body(command), str(command.get("patient_position", "HFS"))
        )
        return {"ok": True}

    def _measure(self, event) -> None:
        """What the machine delivered, whether or not the host ever hears of it."""
        if isinstance(event, MetersetTick):
            self.sent[self._beam_number] = event.meterset
            self.deliveries[-1]["measured"] = event.meterset
        elif isinstance(event, BeamEnded):
            self.sent[self._beam_number] = event.meterset
            self.deliveries[-1].update(
                measured=event.meterset,
                termination=event.termination.value,
                code=event.interlock_code,
                reason=event.reason,
            )

    def _deliver(self, link: Link) -> None:
        events = self.linac.beam_on()
        reached = 0
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
                    reached += 1
                    index = event.index - 1 if "cp-from-zero" in self.quirks else event.index
                    link.send(
                        MessageType.CONTROL_POINT,
                        {"index": index, "meterset": event.meterset, "gantry": event.gantry_angle},
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
            # A controller that loses its host stops the beam at once (hil/PROTOCOL.md,
            # Safety), and keeps the count for the next HELLO_REPLY.
            if "finishes-after-host-loss" not in self.quirks:
                self.linac.stop_beam("the host was lost with the beam on", "LINK")
            for event in events:
                self._measure(event)

    def _abort_delivery(self) -> None:
        if "finishes-after-host-loss" in self.quirks:
            return
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
                self._beam_on(link)
            elif kind == MessageType.INTERRUPT:
                self.linac.interrupt(str(body.get("reason", "")))
            elif kind == MessageType.GET_STATE:
                state = asdict(self.linac.axes())
                state["couch"] = self._couch_body(self.linac.couch_position())
                state["beam_on"] = self._beam_is_on()
                state["busy"] = self._busy_operation if self._is_busy() else ""
                link.send(MessageType.STATE, state)
            elif kind == MessageType.HEARTBEAT:
                state = "busy" if self._is_busy() else "idle"
                if self._beam_is_on():
                    state = "beam_on"
                link.send(MessageType.HEARTBEAT_REPLY, {"state": state, "sessions": self.sessions})
            elif kind in AFTERLOADER_REQUESTS:
                self._error(link, "UNSUPPORTED", f"a linac does not take {kind.name}", kind)
        except DeviceError as exc:
            self._error(link, "LIMIT", str(exc), kind)
        except (KeyError, TypeError, ValueError) as exc:
            self._error(link, "BAD_REQUEST", f"{type(exc).__name__}: {exc}", kind)

    def _error(self, link: Link, code: str, text: str, request: MessageType) -> None:
        link.send(MessageType.ERROR, {"code": code, "text": text[:200], "request": request.name})

    def _beam_is_on(self) -> bool:
        return self._delivery is not None and self._delivery.is_alive()

    def _treating(self) -> bool:
        """The machine is delivering (a beam on, a source out): a silent host is lost."""
        return self._beam_is_on()

    def _beam_on(self, link: Link) -> None:
        if self._beam_is_on() or (self._is_busy() and self._busy_session == self.sessions):
            what = "the beam is on" if self._beam_is_on() else f"{self._busy_operation} runs"
            self._error(link, "BUSY", what, MessageType.BEAM_ON)
            return
        if not self._loaded:
            self._error(link, "NOT_LOADED", "no beam is loaded", MessageType.BEAM_ON)
            return
        self._loaded = False  # a beam is loaded for one BEAM_ON only
        start = self.sent.get(self._beam_number, 0.0)
        beam = {"beam": self._beam_number, "start": start, "measured": start}
        self.deliveries.append({**beam, "termination": "", "code": "", "reason": ""})
        link.send(MessageType.BEAM_STARTED, {"beam": self._beam_number, "start_meterset": start})
        self._delivery = threading.Thread(target=self._deliver, args=(link,), daemon=True)
        self._delivery.start()

    def _is_busy(self) -> bool:
        """A long operation runs: started and not yet answering (once its answer goes, a
        BEAM_ON the host sends on reading it must not be refused as BUSY)."""
        busy = self._busy
        return busy is not None and busy.is_alive() and busy is not self._answering

    def _start_long(self, link: Link, kind: MessageType, body: dict) -> None:
        """One long operation at a time per host session. One left running by an earlier
        session (the host reconnected and asked again) is finished first, not refused."""
        busy = self._is_busy() and self._busy_session == self.sessions
        if busy and "no-busy" not in self.quirks:
            self._error(link, "BUSY", f"{self._busy_operation} is still in progress", kind)
            return
        if self._beam_is_on():
            self._error(link, "BUSY", "the beam is on", kind)
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

        interval = self.timing.progress_interval_s
        if "slow-progress" in self.quirks:
            interval *= 3

        def tick() -> None:
            while not done.wait(interval):
                if self.faults.stalled or session != self.sessions or "no-progress" in self.quirks:
                    continue
                body = {"operation": kind.name, "elapsed_s": round(time.monotonic() - started, 3)}
                if kind.name in self._done:
                    body["done"] = round(self._done[kind.name], 4)
                with contextlib.suppress(LinkLost):
                    link.send(MessageType.PROGRESS, body)

        ticker = threading.Thread(target=tick, daemon=True)
        self._done.pop(kind.name, None)
        ticker.start()
        if previous is not None:
            previous.join()  # the machine does one motion at a time
        try:
            answers = [(LONG_REPLIES[kind], b) for b in self._perform_long(kind, body)]
        except DeviceError as exc:
            answers = [(MessageType.ERROR, {"code": "LIMIT", "text": str(exc)[:200],
                                            "request": kind.name})]  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            answers = [(MessageType.ERROR, {"code": "BAD_REQUEST", "text": str(exc)[:200],
                                            "request": kind.name})]  # fmt: skip
        finally:
            done.set()
        ticker.join(timeout=2)
        while self.faults.stalled:
            time.sleep(0.05)
        self._answering = threading.current_thread()
        if session == self.sessions:
            with contextlib.suppress(LinkLost):
                for answer in answers:
                    link.send(*answer)

    def _perform_long(self, kind: MessageType, body: dict) -> list[dict]:
        """The operation, and the bodies that answer it (IMAGES: one per fragment)."""
        if kind == MessageType.LOAD_BEAM:
            program = program_from_body(body)
            if "no-limit" in self.quirks:
                program = replace(program, energy_mv=self.linac.capabilities().energies_mv[0])
            self.linac.interlocks = dict(self.faults.interlocks)
            self.linac.axis_faults = dict(self.faults.axis_faults)
            overruns = self.faults.overrun_beam in (None, program.beam_number)
            self.linac.overrun_mu = self.faults.overrun_mu if overruns else 0.0
            self.linac.load_beam(program)
            self._beam_number = program.beam_number
            self._loaded = True
            self.acknowledged[program.beam_number] = program.start_meterset
            self.sent[program.beam_number] = program.start_meterset
            return [{"beam": program.beam_number}]
        if kind == MessageType.MOVE_COUCH:
            move = TableTop.from_body(body)
            if "swapped-couch" in self.quirks:
                move = replace(
                    move, longitudinal_mm=move.vertical_mm, vertical_mm=move.longitudinal_mm
                )
            self.linac.axis_faults = dict(self.faults.axis_faults)
            return [self._couch_body(self.linac.move_couch(move))]
        bodies = images_bodies(self.linac.acquire(str(body["kind"])))
        if "images-one-short" in self.quirks:
            bodies = [{**b, "planes_total": b["planes_total"] + 1} for b in bodies]
        return bodies

    def serve(self, transport) -> None:
        """Serves one connection until it closes (or a drop fault closes it). With a beam on,
        nothing from the host for HOST_SILENCE_S means the host is lost (its HEARTBEATs come
        every 0.5 s): the link is closed and the beam stopped."""
        # A quirk breaks the protocol on purpose: its frames must leave as they are.
        link = Link(
            FaultyTransport(transport, self.faults), validate=False if self.quirks else None
        )
        try:
            while not link.closed.is_set():
                if self.faults.drop_requested:
                    self.faults.drop_requested = False
                    self.faults.count("dropped")
                    break
                silent = time.monotonic() - link.last_received > HOST_SILENCE_S
                if silent and self._treating() and not self.faults.stalled:
                    self.faults.count("host_lost")
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
