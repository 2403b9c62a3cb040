"""A Device whose machine is a controller at the other end of a protocol-v1 link.

The serial and TCP backends differ only in how the byte stream is opened. Whatever the
link does, the driver reports as delivered only what the controller reported in intact,
acknowledged frames; if the link drops or the controller stalls while the beam is on, the
beam ends MACHINE at that meterset ("link lost") and the driver reconnects before the next
command.
"""

from __future__ import annotations

import base64
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
    CouchCorrection,
    CouchPosition,
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
from devices.link import (
    Link,
    LinkLost,
    LinkObserver,
    SerialTransport,
    SocketTransport,
    Transport,
)
from devices.protocol import Frame, MessageType
from devices.timing import TIMING_KEYS, TimingBudget

WATCHDOG_SECONDS = 2.0
HEARTBEAT_SECONDS = 0.5
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

    @classmethod
    def parse(cls, url: str) -> DeviceUrl:
        base, _, query = url.partition("?")
        serial_settings: dict = {}
        timing: dict = {}
        passed_on = []
        for key, value in parse_qsl(query, keep_blank_values=True):
            try:
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
        return cls(target, serial_settings, timing)


def program_to_body(beam: BeamProgram) -> dict:
    body = asdict(beam)
    body["control_points"] = [asdict(cp) for cp in beam.control_points]
    return body


class LinkDown(DeviceError):
    """The link died under a request: the request may be sent again on a fresh link."""


class RemoteDevice(Device):
    """The host side of protocol v1. How long it waits is the controller's stated timing
    budget (HELLO_REPLY ``timing``), with a rig's ``timing_overrides`` put over it."""

    def __init__(
        self,
        opener: Callable[[], Transport],
        clock: Clock,
        watchdog: float = WATCHDOG_SECONDS,
        observer: LinkObserver | None = None,
        timing_overrides: dict | None = None,
    ) -> None:
        self.opener = opener
        self.observer = observer
        self.clock = clock
        self.watchdog = watchdog
        self.timing_overrides = dict(timing_overrides or {})
        self.timing = TimingBudget().overridden(self.timing_overrides)
        self.link: Link | None = None
        self._hello: dict = {}
        self._loaded: tuple[int, float] = (0, 0.0)  # beam number and start meterset
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
        reply = self._request(MessageType.HELLO, {"protocol": 1}, {MessageType.HELLO_REPLY})
        self._hello = reply.body
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
                    raise DeviceError(
                        f"controller: {frame.body.get('code')}: {frame.body.get('text')}"
                    )
                if frame.type in expect:
                    return frame
                if frame.type == MessageType.PROGRESS and frame.body.get("operation") == kind.name:
                    heard = now
                if limit is not None and now - started > limit:
                    raise DeviceError(f"{kind.name} took more than its stated {limit:g} s")
        except LinkLost as exc:
            self.close()
            raise LinkDown(f"link lost: {exc}") from exc

    # -- Device ----------------------------------------------------------------------------

    def identify(self) -> Identity:
        return Identity(**self._hello["identity"])

    def capabilities(self) -> Capabilities:
        caps = dict(self._hello["capabilities"])
        caps["energies_mv"] = tuple(caps["energies_mv"])
        caps["patient_positions"] = tuple(caps["patient_positions"])
        return Capabilities(**caps)

    def axes(self) -> AxisState:
        body = self._request(MessageType.GET_STATE, {}, {MessageType.STATE}).body
        return AxisState(
            float(body["gantry_angle"]),
            float(body["collimator_angle"]),
            tuple(body["jaws"]),
            tuple(body["mlc"]),
            tuple(body["couch"]),
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
        self._loaded = (beam.beam_number, beam.start_meterset)

    def beam_on(self) -> Iterator[DeliveryEvent]:
        beam, start = self._loaded
        last = start
        try:
            started = self._request(MessageType.BEAM_ON, {}, {MessageType.BEAM_STARTED})
            last = start = float(started.body.get("start_meterset", start))
            link = self.link
            while True:
                frame = link.recv(timeout=0.05)
                if frame is None:
                    if time.monotonic() - link.last_received > self.watchdog:
                        raise LinkLost(f"nothing from the controller for {self.watchdog} s")
                    if time.monotonic() - link.last_received > HEARTBEAT_SECONDS:
                        link.send(MessageType.HEARTBEAT, {})
                    continue
                body = frame.body
                if frame.type == MessageType.METERSET:
                    last = float(body["meterset"])
                    yield MetersetTick(last, float(body["dose_rate"]))
                elif frame.type == MessageType.CONTROL_POINT:
                    last = float(body["meterset"])
                    yield ControlPointReached(int(body["index"]), last, float(body["gantry"]))
                elif frame.type == MessageType.BEAM_ENDED:
                    yield BeamEnded(
                        float(body["meterset"]),
                        Termination(body["termination"]),
                        str(body.get("reason", "")),
                        str(body.get("code", "")),
                    )
                    return
        except (LinkLost, DeviceError) as exc:
            self.close()
            yield self._count_after_link_loss(beam, start, last, exc)

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

    def move_couch(self, correction: CouchCorrection) -> CouchPosition:
        reply = self._request(
            MessageType.MOVE_COUCH,
            {
                "translation": list(correction.translation),
                "rotation": list(correction.rotation),
            },
            {MessageType.COUCH_POSITION},
        )
        body = reply.body
        return CouchPosition(
            body["lateral"], body["longitudinal"], body["vertical"], tuple(body["rotation"])
        )

    def acquire(self, kind: str) -> ImageSet:
        reply = self._request(MessageType.ACQUIRE, {"kind": kind}, {MessageType.IMAGES})
        body = reply.body
        rows, cols = body["shape"]
        pixels = [
            np.frombuffer(base64.b64decode(p), dtype="<u2").reshape(rows, cols)
            for p in body["planes"]
        ]
        return ImageSet(
            kind,
            pixels,
            float(body["pixel_spacing"]),
            float(body["slice_spacing"]),
            tuple(body["origin"]),
        )


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
        )

    return factory
