"""A Device whose machine is a controller at the other end of a protocol-v2 link.

The serial and TCP backends differ only in how the byte stream is opened. Whatever the
link does, the driver reports as delivered only what the controller reported in intact,
acknowledged frames; if the link drops or the controller stalls while the beam is on, the
beam ends MACHINE at that meterset ("link lost") and the driver reconnects before the next
command.
"""

from __future__ import annotations

import base64
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import parse_qsl

import numpy as np
import serial

from devices.base import (
    AxisState,
    BeamEnded,
    BeamProgram,
    Capabilities,
    ControlPointReached,
    DeliveryEvent,
    Device,
    DeviceError,
    Identity,
    ImageSet,
    MachineDelivery,
    MetersetTick,
    Termination,
)
from devices.clock import Clock
from devices.control_channel import send_command
from devices.couch_axes import TableTop
from devices.geometry import Volume, volume_body
from devices.link import (
    Link,
    LinkLost,
    LinkObserver,
    SerialTransport,
    SocketTransport,
    Transport,
)
from devices.protocol import PROTOCOL_VERSION, Frame, MessageType
from devices.timing import TIMING_KEYS, TimingBudget

WATCHDOG_SECONDS = 2.0
# Serial settings a device URL may carry, by pyserial's own names, and how to read each.
SERIAL_SETTINGS = {
    "baudrate": int,
    "bytesize": int,
    "parity": str,
    "stopbits": float,
    "xonxoff": lambda v: v.lower() in ("1", "true", "yes"),
    "rtscts": lambda v: v.lower() in ("1", "true", "yes"),
    "dsrdtr": lambda v: v.lower() in ("1", "true", "yes"),
}
SERIAL_CHOICES = {
    "parity": ("N", "E", "O", "M", "S"),
    "bytesize": (5, 6, 7, 8),
    "stopbits": (1.0, 1.5, 2.0),
}


@dataclass(frozen=True)
class DeviceUrl:
    """A device URL split into what pyserial or the socket opens, the serial settings and
    the rig's timing overrides: ``serial:///dev/ttyUSB0?baudrate=57600&parity=E&silence_s=10``.
    """

    target: str
    serial: dict
    timing: dict
    # A controller simulator's control channel (``?control=HOST:PORT``): where the host
    # tells it which patient lies on the couch. A real controller has none.
    control: tuple[str, int] | None = None

    @classmethod
    def parse(cls, url: str) -> DeviceUrl:
        base, _, query = url.partition("?")
        serial_settings: dict = {}
        timing: dict = {}
        control = None
        passed_on = []
        for key, value in parse_qsl(query, keep_blank_values=True):
            try:
                if key == "control":
                    host, _, port = value.rpartition(":")
                    control = (host or "127.0.0.1", int(port))
                    continue
                if key in SERIAL_SETTINGS:
                    serial_settings[key] = SERIAL_SETTINGS[key](value)
                elif key in TIMING_KEYS:
                    timing[key] = float(value)
                else:
                    passed_on.append(f"{key}={value}")  # a pyserial URL handler's own option
                    continue
            except ValueError as exc:
                raise ValueError(f"device URL option {key}={value!r}: {exc}") from exc
            allowed = SERIAL_CHOICES.get(key)
            if allowed and serial_settings[key] not in allowed:
                raise ValueError(f"device URL option {key} must be one of {allowed}")
        target = base + ("?" + "&".join(passed_on) if passed_on else "")
        return cls(target, serial_settings, timing, control)


def program_to_body(beam: BeamProgram) -> dict:
    body = asdict(beam)
    body["control_points"] = [asdict(cp) for cp in beam.control_points]
    return body


class LinkDown(DeviceError):
    """The link died under a request: the request may be sent again on a fresh link."""


class ControllerRefused(DeviceError):
    """The controller answered a request with ERROR: it did not do it (a refused BEAM_ON
    turned no beam on, so there is no count to reconcile)."""


class RemoteDevice(Device):
    """The host side of protocol version 2. How long it waits is the controller's stated timing
    budget (HELLO_REPLY ``timing``), with a rig's ``timing_overrides`` put over it."""

    def __init__(
        self,
        opener: Callable[[], Transport],
        clock: Clock,
        watchdog: float = WATCHDOG_SECONDS,
        observer: LinkObserver | None = None,
        timing_overrides: dict | None = None,
        control: tuple[str, int] | None = None,
    ) -> None:
        self.opener = opener
        self.control = control
        self.observer = observer
        self.clock = clock
        self.watchdog = watchdog
        self.timing_overrides = dict(timing_overrides or {})
        self.timing = TimingBudget().overridden(self.timing_overrides)
        self.link: Link | None = None
        self._hello: dict = {}
        self._loaded: BeamProgram | None = None
        self._couch = TableTop()  # where the table top is, as the controller last said
        self._lock = threading.Lock()
        self.reconnects = 0

    # -- link ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Opens the link and says HELLO. At start-up a controller may still be booting or
        its line not yet up: opening is retried for ``reconnect_s`` before it fails with the
        reason (never a bare traceback)."""
        deadline = time.monotonic() + self.timing.reconnect_s
        while True:
            try:
                transport = self.opener()
                break
            except (OSError, serial.SerialException) as exc:
                if time.monotonic() + 0.5 > deadline:
                    raise DeviceError(
                        f"cannot open the controller link: {exc} (tried for "
                        f"{self.timing.reconnect_s:g} s; is the controller on and the address "
                        "right?)"
                    ) from exc
                time.sleep(0.5)
        self.link = Link(transport, observer=self.observer)
        reply = self._request(
            MessageType.HELLO, {"protocol": PROTOCOL_VERSION}, {MessageType.HELLO_REPLY}
        )
        spoken = reply.body.get("protocol")
        if spoken != PROTOCOL_VERSION:
            self.close()
            raise DeviceError(
                f"the controller speaks protocol {spoken}; this host speaks "
                f"{PROTOCOL_VERSION} (hil/PROTOCOL.md, Versioning): update its firmware"
            )
        self._hello = reply.body
        self._couch = TableTop.from_body(reply.body["couch"])
        stated = TimingBudget.from_body(reply.body.get("timing"))
        self.timing = stated.overridden(self.timing_overrides)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def _ensure_link(self) -> Link:
        if self.link is None or self.link.closed.is_set():
            self.close()
            self.reconnects += 1
            self.connect()
        return self.link

    # Requests the host may send again after reconnecting: they set a state rather than
    # change it by an amount (a couch correction is relative, a beam-on starts a beam).
    IDEMPOTENT = (MessageType.LOAD_BEAM, MessageType.GET_STATE, MessageType.ACQUIRE)

    def _request(self, kind: MessageType, body: dict, expect: set[MessageType]) -> Frame:
        """:meth:`_send_and_wait`, once more on a fresh link if the link died under an
        idempotent request (a dropped TCP connection, a pty reopened)."""
        try:
            return self._send_and_wait(kind, body, expect)
        except LinkDown:
            if kind not in self.IDEMPOTENT:
                raise
            return self._send_and_wait(kind, body, expect)

    def _send_and_wait(self, kind: MessageType, body: dict, expect: set[MessageType]) -> Frame:
        """Sends a request and waits for its answer as the timing budget says: while the
        controller reports PROGRESS on it, however long the operation takes (up to its stated
        maximum); a request unheard of for ``silence_s`` has failed. HEARTBEATs keep going
        meanwhile, so a controller that is busy still shows it is alive."""
        link = self.link if kind == MessageType.HELLO else self._ensure_link()
        budget = self.timing
        silence = budget.hello_s if kind == MessageType.HELLO else budget.silence_s
        limit = budget.limit_for(kind.name)
        try:
            link.send(kind, body)
            started = heard = beat = time.monotonic()
            while True:
                frame = link.recv(timeout=0.05)
                now = time.monotonic()
                if frame is None:
                    if now - heard > silence:
                        raise DeviceError(
                            f"no reply or PROGRESS for {kind.name} within {silence:g} s"
                        )
                    if kind != MessageType.HELLO and now - beat > budget.heartbeat_s:
                        link.send(MessageType.HEARTBEAT, {})
                        beat = now
                    continue
                if frame.type == MessageType.ERROR:
                    raise ControllerRefused(
                        f"controller refused {frame.body.get('request') or kind.name}: "
                        f"{frame.body.get('code')}: {frame.body.get('text')}"
                    )
                if frame.type in expect:
                    return frame
                if frame.type == MessageType.PROGRESS and frame.body.get("operation") == kind.name:
                    heard = now
                    if "done" in frame.body:
                        self._report_progress(kind.name, float(frame.body["done"]))
                if limit is not None and now - started > limit:
                    raise DeviceError(f"{kind.name} took more than its stated {limit:g} s")
        except LinkLost as exc:
            self.close()
            raise LinkDown(f"link lost: {exc}") from exc

    # -- Device ----------------------------------------------------------------------------

    def identify(self) -> Identity:
        return Identity(**self._hello["identity"])

    def capabilities(self) -> Capabilities:
        """HELLO_REPLY ``capabilities`` (hil/PROTOCOL.md's table): the fields this host
        knows, the tolerances' defaults where the controller states none."""
        known = {f.name for f in dataclasses.fields(Capabilities)}
        caps = {k: v for k, v in self._hello["capabilities"].items() if k in known}
        caps["energies_mv"] = tuple(caps["energies_mv"])
        caps["patient_positions"] = tuple(caps["patient_positions"])
        return Capabilities(**caps)

    def axes(self) -> AxisState:
        body = self._request(MessageType.GET_STATE, {}, {MessageType.STATE}).body
        self._couch = TableTop.from_body(body["couch"])
        return AxisState(
            float(body["gantry_angle"]),
            float(body["collimator_angle"]),
            tuple(body["jaws"]),
            tuple(body["mlc"]),
            self._couch,
        )

    def last_delivery(self) -> MachineDelivery | None:
        """From the last HELLO reply: the controller ends any beam still on before it."""
        last = self._hello.get("last_delivery")
        if not last or not last.get("termination"):
            return None
        return MachineDelivery(
            int(last["beam"]), float(last["start"]), float(last["measured"]), last["termination"]
        )

    def load_beam(self, beam: BeamProgram) -> None:
        self._request(MessageType.LOAD_BEAM, program_to_body(beam), {MessageType.LOADED})
        self._loaded = beam

    def beam_on(self) -> Iterator[DeliveryEvent]:
        """The loaded beam's events as the controller reports them, each checked against
        hil/PROTOCOL.md (Delivery): a control point out of its order, or a count that
        falls, is a protocol error that holds the beam (:meth:`_protocol_error`)."""
        program = self._loaded
        if program is None:
            raise DeviceError("no beam loaded")
        self._loaded = None  # a beam is loaded for one BEAM_ON only
        beam, start = program.beam_number, program.start_meterset
        points = iter(reachable_points(program))
        last = start
        try:
            started = self._request(MessageType.BEAM_ON, {}, {MessageType.BEAM_STARTED})
        except ControllerRefused:
            raise  # no beam was turned on: a device error before the beam, nothing delivered
        except (LinkLost, DeviceError) as exc:
            self.close()
            yield self._count_after_link_loss(beam, start, last, exc)
            return
        try:
            last = start = float(started.body.get("start_meterset", start))
            link = self.link
            while True:
                frame = link.recv(timeout=0.05)
                if frame is None:
                    if time.monotonic() - link.last_received > self._beam_watchdog():
                        raise LinkLost(
                            f"nothing from the controller for {self._beam_watchdog():g} s"
                        )
                    if time.monotonic() - link.last_received > self.timing.heartbeat_s:
                        link.send(MessageType.HEARTBEAT, {})
                    continue
                body = frame.body
                if frame.type == MessageType.METERSET:
                    count = float(body["meterset"])
                    if count < last - 1e-6:
                        yield self._protocol_error(
                            f"METERSET fell from {last:g} to {count:g}", last
                        )
                        return
                    last = count
                    yield MetersetTick(last, float(body["dose_rate"]))
                elif frame.type == MessageType.CONTROL_POINT:
                    index, expected = int(body["index"]), next(points, None)
                    if index != expected:
                        wanted = "none" if expected is None else str(expected)
                        why = f"CONTROL_POINT index {index} where {wanted} was next"
                        yield self._protocol_error(why, last)
                        return
                    last = max(last, float(body["meterset"]))
                    yield ControlPointReached(index, last, float(body["gantry"]))
                elif frame.type == MessageType.BEAM_ENDED:
                    yield BeamEnded(
                        max(last, float(body["meterset"])),
                        Termination(body["termination"]),
                        str(body.get("reason", "")),
                        str(body.get("code", "")),
                    )
                    return
        except (LinkLost, DeviceError) as exc:
            self.close()
            yield self._count_after_link_loss(beam, start, last, exc)

    def _beam_watchdog(self) -> float:
        """With a beam on, nothing heard for this long means the link is lost."""
        return max(self.watchdog, 4 * self.timing.tick_s)

    def _protocol_error(self, why: str, last: float) -> BeamEnded:
        """The controller broke hil/PROTOCOL.md during a beam: hold it, read its final count,
        and end it MACHINE with code PROTOCOL (the index it sent is never recorded)."""
        final = last
        link = self.link
        try:
            link.send(MessageType.INTERRUPT, {"reason": f"protocol error: {why}"})
            deadline = time.monotonic() + self.timing.silence_s
            while time.monotonic() < deadline:
                frame = link.recv(timeout=0.05)
                if frame is None:
                    continue
                if frame.type == MessageType.METERSET:
                    final = max(final, float(frame.body["meterset"]))
                elif frame.type == MessageType.BEAM_ENDED:
                    final = max(final, float(frame.body["meterset"]))
                    break
        except LinkLost:
            self.close()
        return BeamEnded(final, Termination.MACHINE, f"protocol error: {why}", "PROTOCOL")

    def _count_after_link_loss(
        self, beam: int, start: float, heard: float, cause: Exception
    ) -> BeamEnded:
        """The beam-on the link died in, as the controller counted it.

        The host reconnects (for up to ``reconnect_s``); the controller ends a beam still on
        when HELLO arrives and reports it in ``last_delivery``. If that is the same beam-on
        (same beam, same start, at least what the host heard), its count stands: frames in
        flight are not lost, so a continuation never delivers them again. Otherwise the beam
        ends UNKNOWN at the last meterset heard, and the TMS must have it reviewed.
        """
        deadline = time.monotonic() + self.timing.reconnect_s
        while time.monotonic() < deadline:
            try:
                self.connect()
            except DeviceError:
                self.close()
                time.sleep(0.5)
                continue
            self.reconnects += 1
            report = self.last_delivery()
            same = (
                report is not None
                and report.beam_number == beam
                and abs(report.start_meterset - start) < 1e-6
                and report.meterset >= heard - 1e-6
            )
            if same:
                ended = (
                    Termination.NORMAL if report.termination == "NORMAL" else Termination.MACHINE
                )
                return BeamEnded(
                    report.meterset,
                    ended,
                    f"link lost: {cause}; the controller counted {report.meterset:g} MU",
                    "LINK",
                )
            break
        return BeamEnded(
            heard,
            Termination.UNKNOWN,
            f"link lost: {cause}; the controller's count could not be confirmed",
            "LINK",
        )

    def interrupt(self, reason: str) -> None:
        link = self.link
        if link is not None and not link.closed.is_set():
            try:
                link.send(MessageType.INTERRUPT, {"reason": reason})
            except LinkLost:
                self.close()

    def move_couch(self, move: TableTop) -> TableTop:
        reply = self._request(MessageType.MOVE_COUCH, move.as_body(), {MessageType.COUCH_POSITION})
        self._couch = TableTop.from_body(reply.body)
        return self._couch

    def couch_position(self) -> TableTop:
        return self._couch

    def place_patient(self, anatomy: Volume, patient_position: str = "HFS") -> None:
        """A controller simulator with a control channel (``?control=HOST:PORT``) is told
        whose anatomy lies on its couch, so its CBCT images this patient; a real controller
        images the real one, and the host tells it nothing."""
        if self.control is None:
            return
        command = {"command": "place_patient", "patient_position": patient_position}
        command.update(volume_body(anatomy))
        reply = send_command(self.control, command, timeout=60)
        if not reply.get("ok"):
            raise DeviceError(f"the controller simulator did not take the patient: {reply}")

    def acquire(self, kind: str) -> ImageSet:
        """ACQUIRE, and its IMAGES fragments put together (hil/PROTOCOL.md, Images)."""
        first = self._request(MessageType.ACQUIRE, {"kind": kind}, {MessageType.IMAGES}).body
        assembly = ImageAssembly(first)
        while not assembly.complete:
            frame = self._next_frame({MessageType.IMAGES}, "IMAGES")
            assembly.add(frame.body)
        return assembly.image_set()

    def _next_frame(self, kinds: set[MessageType], what: str) -> Frame:
        """The next frame of ``kinds`` on the open link within ``silence_s``."""
        link = self._ensure_link()
        heard = time.monotonic()
        try:
            while True:
                frame = link.recv(timeout=0.05)
                if frame is not None and frame.type in kinds:
                    return frame
                if frame is not None and frame.type == MessageType.ERROR:
                    raise DeviceError(f"controller: {frame.body.get('code')}: {frame.body}")
                if time.monotonic() - heard > self.timing.silence_s:
                    raise DeviceError(f"no {what} within {self.timing.silence_s:g} s")
        except LinkLost as exc:
            self.close()
            raise LinkDown(f"link lost: {exc}") from exc


class ImageAssembly:
    """IMAGES fragments put together: whole planes in order, one geometry, until
    ``planes_total`` planes arrived; anything else is a protocol error (DeviceError)."""

    GEOMETRY = ("kind", "encoding", "rows", "columns", "planes_total", "pixel_spacing",
                "slice_spacing", "origin")  # fmt: skip

    def __init__(self, first: dict) -> None:
        if first.get("encoding") != "uint16le-hu1024":
            raise DeviceError(f"IMAGES encoding {first.get('encoding')!r}: not uint16le-hu1024")
        self.geometry = {k: first[k] for k in self.GEOMETRY}
        self.planes: list[np.ndarray] = []
        self.add(first)

    @property
    def complete(self) -> bool:
        return len(self.planes) >= int(self.geometry["planes_total"])

    def add(self, body: dict) -> None:
        if {k: body[k] for k in self.GEOMETRY} != self.geometry:
            raise DeviceError("IMAGES fragment with another geometry than the first")
        if int(body["first_plane"]) != len(self.planes):
            raise DeviceError(
                f"IMAGES fragment from plane {body['first_plane']}, {len(self.planes)} expected"
            )
        rows, columns = int(self.geometry["rows"]), int(self.geometry["columns"])
        for text in body["planes"]:
            raw = base64.b64decode(text)
            if len(raw) != rows * columns * 2:
                raise DeviceError(f"IMAGES plane of {len(raw)} bytes, not {rows * columns * 2}")
            self.planes.append(np.frombuffer(raw, dtype="<u2").reshape(rows, columns))
        if len(self.planes) > int(self.geometry["planes_total"]):
            raise DeviceError("more IMAGES planes than planes_total")

    def image_set(self) -> ImageSet:
        g = self.geometry
        return ImageSet(
            str(g["kind"]),
            self.planes,
            float(g["pixel_spacing"]),
            float(g["slice_spacing"]),
            tuple(float(v) for v in g["origin"]),
        )


def reachable_points(program: BeamProgram) -> list[int]:
    """The Control Point Indices a delivery of ``program`` reaches, in order: those after
    its start meterset, up to its end (hil/PROTOCOL.md, Delivery: never index 0)."""
    stop = program.stop_meterset
    return [
        cp.index
        for cp in program.control_points[1:]
        if program.start_meterset + 1e-9 < cp.cumulative_meterset <= stop + 1e-9
    ]


def _timing(url: DeviceUrl, options: dict) -> dict:
    """The rig's timing overrides: the YAML config's ``device_timing``, then the URL's."""
    return {**dict(options.get("timing") or {}), **url.timing}


def link_opener(spec: str) -> tuple[Callable[[], Transport], DeviceUrl]:
    """How to open the byte stream of a protocol device spec (``serial:///dev/ttyUSB0?..``,
    ``tcp://HOST:PORT``, ``rfc2217://HOST:PORT``, ``socket://HOST:PORT``), and its URL."""
    scheme, _, rest = spec.partition(":")
    if scheme == "tcp":
        url = DeviceUrl.parse(rest)
        host, _, port = url.target.lstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"tcp device needs tcp://HOST:PORT, not {spec}")
        return (lambda: SocketTransport.connect(host, int(port))), url
    if scheme == "serial":
        url = DeviceUrl.parse(rest[2:] if rest.startswith("///") else rest)
    elif scheme in ("rfc2217", "socket"):
        url = DeviceUrl.parse(spec)
    else:
        raise ValueError(f"{spec!r} is not a serial, tcp, rfc2217 or socket device URL")
    return (lambda: SerialTransport(url.target, **url.serial)), url


def protocol_device(scheme: str):
    """The backend for one protocol-v1 scheme: ``serial:///dev/ttyUSB0?baudrate=57600&
    parity=E&rtscts=1`` (pyserial's setting names; default 115200 8N1; any pyserial URL such
    as ``serial:loop://``), ``tcp://HOST:PORT``, and pyserial's network handlers
    ``rfc2217://HOST:PORT`` (a terminal server) and ``socket://HOST:PORT`` (a raw bridge)."""

    def factory(rest: str, clock: Clock, options: dict) -> Device:
        opener, url = link_opener(f"{scheme}:{rest}")
        return RemoteDevice(
            opener,
            clock,
            observer=options.get("link_observer"),
            timing_overrides=_timing(url, options),
            control=url.control,
        )

    return factory
