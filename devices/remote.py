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
from dataclasses import asdict

import numpy as np

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

WATCHDOG_SECONDS = 2.0
HEARTBEAT_SECONDS = 0.5


def program_to_body(beam: BeamProgram) -> dict:
    body = asdict(beam)
    body["control_points"] = [asdict(cp) for cp in beam.control_points]
    return body


class RemoteDevice(Device):
    def __init__(
        self,
        opener: Callable[[], Transport],
        clock: Clock,
        watchdog: float = WATCHDOG_SECONDS,
        reply_timeout: float = 10.0,
        observer: LinkObserver | None = None,
    ) -> None:
        self.opener = opener
        self.observer = observer
        self.clock = clock
        self.watchdog = watchdog
        self.reply_timeout = reply_timeout
        self.link: Link | None = None
        self._hello: dict = {}
        self._lock = threading.Lock()
        self.reconnects = 0

    # -- link ------------------------------------------------------------------------------

    def connect(self) -> None:
        self.link = Link(self.opener(), observer=self.observer)
        reply = self._request(MessageType.HELLO, {"protocol": 1}, {MessageType.HELLO_REPLY})
        self._hello = reply.body

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

    def _request(self, kind: MessageType, body: dict, expect: set[MessageType]) -> Frame:
        link = self.link if kind == MessageType.HELLO else self._ensure_link()
        try:
            link.send(kind, body)
            deadline = time.monotonic() + self.reply_timeout
            while time.monotonic() < deadline:
                frame = link.recv(timeout=0.1)
                if frame is None:
                    continue
                if frame.type == MessageType.ERROR:
                    raise DeviceError(
                        f"controller: {frame.body.get('code')}: {frame.body.get('text')}"
                    )
                if frame.type in expect:
                    return frame
        except LinkLost as exc:
            self.close()
            raise DeviceError(f"link lost: {exc}") from exc
        raise DeviceError(f"no reply to {kind.name} within {self.reply_timeout} s")

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

    def beam_on(self) -> Iterator[DeliveryEvent]:
        last = 0.0
        try:
            started = self._request(MessageType.BEAM_ON, {}, {MessageType.BEAM_STARTED})
            last = float(started.body.get("start_meterset", 0.0))
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
            self.close()  # reconnect before the next command
            yield BeamEnded(last, Termination.MACHINE, f"link lost: {exc}", "LINK")

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


def make_serial_device(rest: str, clock: Clock, options: dict) -> Device:
    """``serial:///dev/pts/3`` or any pyserial URL (``serial:loop://``)."""
    url = rest[2:] if rest.startswith("///") else rest
    return RemoteDevice(lambda: SerialTransport(url), clock, observer=options.get("link_observer"))


def make_tcp_device(rest: str, clock: Clock, options: dict) -> Device:
    """``tcp://HOST:PORT``."""
    host, _, port = rest.lstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"tcp device needs tcp://HOST:PORT, not tcp:{rest}")
    return RemoteDevice(
        lambda: SocketTransport.connect(host, int(port)),
        clock,
        observer=options.get("link_observer"),
    )
