"""A Machine that is a controller at the other end of a protocol-v2 link: a linac
(:class:`RemoteDevice`) or an HDR afterloader (:class:`RemoteAfterloader`), whichever its
HELLO_REPLY says it drives (hil/PROTOCOL.md, HELLO_REPLY ``machine``).

The serial and TCP backends differ only in how the byte stream is opened. Whatever the
link does, the driver reports as delivered only what the controller reported in intact,
acknowledged frames; if the link drops or the controller stalls while the beam is on (or
the source is out), the beam (channel) ends MACHINE at that count ("link lost") and the
driver reconnects before the next command.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import parse_qsl

import numpy as np
import serial

from devices.afterloader import (
    Afterloader,
    AfterloaderEvent,
    AfterloaderLimits,
    BrachySource,
    ChannelEnded,
    ChannelProgramme,
    ChannelTick,
    Dwell,
    DwellDone,
)
from devices.base import (
    AxisState,
    BeamDeliverer,
    BeamEnded,
    BeamProgram,
    Capabilities,
    ControlPointReached,
    DeliveryEvent,
    DeviceError,
    Identity,
    Imager,
    ImageSet,
    Machine,
    MachineDelivery,
    MetersetTick,
    Positioner,
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


# How long a host waits, TREAT refused INTERLOCK, for the door to be closed again.
INTERLOCK_WAIT_S = 60.0


class ControllerRefused(DeviceError):
    """The controller answered a request with ERROR: it did not do it (a refused BEAM_ON
    turned no beam on, so there is no count to reconcile). ``code`` is the ERROR's."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class RemoteMachine(Machine):
    """The host side of protocol version 2, whatever machine the controller drives: the link,
    HELLO, and requests waited for as the controller's stated timing budget (HELLO_REPLY
    ``timing``) says, with a rig's ``timing_overrides`` put over it.

    A subclass drives one machine kind (``kind``). Built as this class itself (a device URL
    opened with no hint of the machine behind it), the object becomes the subclass for the
    kind HELLO_REPLY names when it connects, so a role check after ``connect()`` sees the
    right roles; built as a subclass, a controller of another kind is refused in words.
    """

    kind: str | None = None  # the HELLO_REPLY ``machine`` this class drives (None: any)

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
        self._become(str(reply.body.get("machine") or "linac"))
        self._hello = reply.body
        self._greeted(reply.body)
        stated = TimingBudget.from_body(reply.body.get("timing"))
        self.timing = stated.overridden(self.timing_overrides)

    def _become(self, kind: str) -> None:
        """This object as the class for the machine the controller drives (a generic
        RemoteMachine becomes it; a RemoteDevice told of an afterloader refuses)."""
        wanted = REMOTE_MACHINES.get(kind)
        if wanted is None:
            self.close()
            raise DeviceError(
                f"the controller drives a machine of kind {kind!r}; this host knows "
                f"{' and '.join(REMOTE_MACHINES)} (hil/PROTOCOL.md, HELLO_REPLY)"
            )
        if type(self) is RemoteMachine:
            self.__class__ = wanted
        elif not isinstance(self, wanted):
            self.close()
            raise DeviceError(
                f"the controller drives {_an(kind)}; this device was configured for "
                f"{_an(self.kind or '?')} (hil/PROTOCOL.md, HELLO_REPLY machine)"
            )

    def _greeted(self, hello: dict) -> None:
        """What this machine kind takes from a HELLO_REPLY besides identity and timing."""

    def _unsolicited(self, frame: Frame) -> None:
        """A frame that arrived while the host waited for another (an event, a late one)."""

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
                        f"{frame.body.get('code')}: {frame.body.get('text')}",
                        str(frame.body.get("code") or ""),
                    )
                if frame.type in expect:
                    return frame
                if frame.type == MessageType.PROGRESS and frame.body.get("operation") == kind.name:
                    heard = now
                    if "done" in frame.body:
                        self._report_progress(kind.name, float(frame.body["done"]))
                else:
                    self._unsolicited(frame)
                if limit is not None and now - started > limit:
                    raise DeviceError(f"{kind.name} took more than its stated {limit:g} s")
        except LinkLost as exc:
            self.close()
            raise LinkDown(f"link lost: {exc}") from exc

    def identify(self) -> Identity:
        return Identity(**self._hello["identity"])

    def _beam_watchdog(self) -> float:
        """With a beam on (a source out), nothing heard for this long: the link is lost."""
        return max(self.watchdog, 4 * self.timing.tick_s)


class RemoteDevice(RemoteMachine, BeamDeliverer, Positioner, Imager):
    """A linac controller: beams, the couch and imaging (hil/PROTOCOL.md, Delivery, Couch,
    Images)."""

    kind = "linac"

    def _greeted(self, hello: dict) -> None:
        self._couch = TableTop.from_body(hello["couch"])

    # -- Device ----------------------------------------------------------------------------

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


@dataclass(frozen=True)
class SourceStatus:
    """An afterloader's SOURCE_STATUS: its source as calibrated, where the source is
    (``"safe"`` or ``"out"``) and the treatment room door (``"closed"`` or ``"open"``)."""

    source: BrachySource
    position: str
    door: str


def channel_to_body(programme: ChannelProgramme) -> dict:
    """LOAD_CHANNEL's body (hil/PROTOCOL.md, Afterloader). On the wire dwells are numbered
    0, 1, 2, ... in delivery order, whatever the host calls them (a continuation's dwells
    are the plan's later ones): :func:`in_programme_numbers` maps the controller's back."""
    return {
        "channel": programme.channel,
        "length_mm": programme.length_mm,
        "dwells": [
            {"index": wire, "position_mm": d.position_mm, "time_s": d.time_s}
            for wire, d in enumerate(programme.dwells)
        ],
    }


def in_programme_numbers(event: AfterloaderEvent, programme: ChannelProgramme) -> AfterloaderEvent:
    """An event whose dwell numbers are the wire's (0, 1, 2, ... of the LOAD_CHANNEL sent),
    renumbered as the programme numbers its dwells."""
    dwells = programme.dwells

    def host(wire: int | None) -> int | None:
        return dwells[wire].index if wire is not None and 0 <= wire < len(dwells) else wire

    if isinstance(event, DwellDone):
        return dataclasses.replace(event, index=host(event.index))
    if isinstance(event, ChannelEnded):
        return dataclasses.replace(event, dwell=host(event.dwell))
    return event


def channel_from_body(body: dict) -> ChannelProgramme:
    """A LOAD_CHANNEL body as a programme; ValueError for dwells not numbered 0, 1, 2, ..."""
    dwells = tuple(
        Dwell(int(d["index"]), float(d["position_mm"]), float(d["time_s"])) for d in body["dwells"]
    )
    indices = [d.index for d in dwells]
    if indices != list(range(len(dwells))):
        raise ValueError(f"dwell indices {indices}: they must be 0, 1, 2, ... in order")
    return ChannelProgramme(int(body["channel"]), float(body["length_mm"]), dwells)


def local_datetime(text: str) -> dt.datetime:
    """An ISO 8601 date-time as the host's local time (naive), whatever offset it carries."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.astimezone().replace(tzinfo=None) if moment.tzinfo else moment


class RemoteAfterloader(RemoteMachine, Afterloader):
    """An HDR afterloader controller (hil/PROTOCOL.md, Afterloader): its source, its limits,
    one channel loaded and treated at a time.

    What it reports as delivered is what the controller reported in intact frames: the
    seconds of DWELL_PROGRESS and DWELL_DONE, and CHANNEL_ENDED's final count. If the link
    dies with a channel treated, the controller retracts the source; the host reconnects for
    ``reconnect_s`` and takes the controller's own count of that treatment (HELLO_REPLY
    ``last_channel``), or ends the channel UNKNOWN at the seconds it last heard.
    """

    kind = "afterloader"
    IDEMPOTENT = (MessageType.LOAD_CHANNEL, MessageType.GET_SOURCE_STATUS)

    door = "closed"  # the treatment room door, as the controller last said
    _channel: ChannelProgramme | None = None
    _treatment = 0

    def _unsolicited(self, frame: Frame) -> None:
        if frame.type == MessageType.DOOR:
            self.door = str(frame.body.get("door", self.door))

    def source_status(self) -> SourceStatus:
        body = self._request(MessageType.GET_SOURCE_STATUS, {}, {MessageType.SOURCE_STATUS}).body
        self.door = str(body["door"])
        source = BrachySource(
            str(body["isotope"]),
            float(body["half_life_days"]),
            float(body["reference_air_kerma_rate"]),
            local_datetime(str(body["reference_datetime"])),
        )
        return SourceStatus(source, str(body["source_position"]), self.door)

    def source(self) -> BrachySource:
        return self.source_status().source

    def afterloader_limits(self) -> AfterloaderLimits:
        caps = self._hello["capabilities"]
        return AfterloaderLimits(
            channels=int(caps["channels"]),
            max_channel_length_mm=float(caps["max_channel_length_mm"]),
            min_dwell_s=float(caps["min_dwell_s"]),
            max_dwell_s=float(caps["max_dwell_s"]),
            max_dwells_per_channel=int(caps["max_dwells_per_channel"]),
        )

    def last_channel(self) -> dict | None:
        """HELLO_REPLY ``last_channel``: the controller's own count of its last treatment."""
        return self._hello.get("last_channel")

    def load_channel(self, programme: ChannelProgramme) -> None:
        """LOAD_CHANNEL; the controller refuses (ERROR) a channel outside its limits before
        anything moves, and says what it loaded, which must be what was sent."""
        self._channel = None
        reply = self._request(
            MessageType.LOAD_CHANNEL, channel_to_body(programme), {MessageType.LOADED}
        ).body
        said = (reply.get("channel"), reply.get("dwells"), float(reply.get("total_s", -1.0)))
        if (
            said[0] != programme.channel
            or said[1] != len(programme.dwells)
            or abs(said[2] - programme.total_s) > 1e-3
        ):
            raise DeviceError(
                f"the controller loaded channel {said[0]} with {said[1]} dwells of {said[2]:g} "
                f"s, not channel {programme.channel} with {len(programme.dwells)} of "
                f"{programme.total_s:g} s: nothing is treated"
            )
        self._channel = programme
        self._treatment = int(reply["treatment"])

    def treat(self) -> Iterator[AfterloaderEvent]:
        """The loaded channel's events as the controller reports them, each held to
        hil/PROTOCOL.md (Afterloader): a count that falls, a DWELL_DONE out of the
        programme's order, or a NORMAL end before every dwell is a protocol error that
        retracts the source (:meth:`_protocol_error`). Dwells carry the programme's
        numbers, not the wire's."""
        programme = self._channel
        for event in self._treat_on_the_wire():
            yield in_programme_numbers(event, programme) if programme else event

    def _treat_on_the_wire(self) -> Iterator[AfterloaderEvent]:
        programme, self._channel = self._channel, None
        if programme is None:
            raise DeviceError("no channel loaded")
        number, treatment = programme.channel, self._treatment
        progress = _ChannelHeard(programme, treatment)
        try:
            started = self._treat_when_the_door_closes()
        except ControllerRefused:
            raise  # the controller did not start it: nothing moved, nothing delivered
        except (LinkLost, DeviceError) as exc:
            self.close()
            yield from self._after_link_loss(progress, treatment, exc)
            return
        try:
            body = started.body
            if (body.get("channel"), body.get("treatment")) != (number, treatment):
                yield self._protocol_error(
                    f"CHANNEL_STARTED for channel {body.get('channel')} treatment "
                    f"{body.get('treatment')}, not channel {number} treatment {treatment}",
                    progress,
                )
                return
            link = self.link
            while True:
                frame = link.recv(timeout=0.05)
                if frame is None:
                    silent = time.monotonic() - link.last_received
                    if silent > self._beam_watchdog():
                        raise LinkLost(f"nothing from the controller for {silent:.1f} s")
                    if silent > self.timing.heartbeat_s:
                        link.send(MessageType.HEARTBEAT, {})
                    continue
                if frame.type == MessageType.DOOR:
                    self._unsolicited(frame)
                    continue
                if frame.type not in _CHANNEL_FRAMES:
                    continue
                why = progress.problem(frame)
                if why:
                    yield self._protocol_error(why, progress)
                    return
                event = progress.take(frame)
                yield event
                if isinstance(event, ChannelEnded):
                    return
        except (LinkLost, DeviceError) as exc:
            self.close()
            yield from self._after_link_loss(progress, treatment, exc)

    def _treat_when_the_door_closes(self) -> Frame:
        """TREAT; refused INTERLOCK (the door still open after an interruption), the
        channel stays loaded and TREAT is asked again until the door closes, for at most
        ``INTERLOCK_WAIT_S``: a console waits for the room to be closed, it does not give
        up the treatment."""
        deadline = time.monotonic() + INTERLOCK_WAIT_S
        while True:
            try:
                return self._request(MessageType.TREAT, {}, {MessageType.CHANNEL_STARTED})
            except ControllerRefused as refused:
                if refused.code != "INTERLOCK" or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def _protocol_error(self, why: str, progress: _ChannelHeard) -> ChannelEnded:
        """The controller broke hil/PROTOCOL.md during a channel: retract the source, read
        its final count, end the channel MACHINE with code PROTOCOL."""
        final, dwell = progress.heard, None
        link = self.link
        try:
            link.send(MessageType.RETRACT, {"reason": f"protocol error: {why}"})
            deadline = time.monotonic() + self.timing.silence_s
            while time.monotonic() < deadline:
                frame = link.recv(timeout=0.05)
                if frame is None:
                    continue
                if frame.type == MessageType.DWELL_PROGRESS:
                    final = max(final, float(frame.body["delivered_s"]))
                elif frame.type == MessageType.CHANNEL_ENDED:
                    final = max(final, float(frame.body["delivered_s"]))
                    dwell = frame.body.get("dwell")
                    break
        except LinkLost:
            self.close()
        return ChannelEnded(
            progress.programme.channel,
            round(final, 4),
            Termination.MACHINE,
            f"protocol error: {why}",
            "PROTOCOL",
            None if dwell is None else int(dwell),
        )

    def _after_link_loss(
        self, progress: _ChannelHeard, treatment: int, cause: Exception
    ) -> Iterator[AfterloaderEvent]:
        """The treatment the link died in, as the controller counted it.

        The controller retracts the source when it loses its host and keeps the count
        (HELLO_REPLY ``last_channel``). The host reconnects for up to ``reconnect_s``: the
        same treatment, at least what the host heard, stands (with the dwells it finished
        whose DWELL_DONE was lost); a treatment the controller never began delivered
        nothing; otherwise the channel ends UNKNOWN at the seconds last heard.
        """
        number, heard = progress.programme.channel, progress.heard
        deadline = time.monotonic() + self.timing.reconnect_s
        while time.monotonic() < deadline:
            try:
                self.connect()
            except DeviceError:
                self.close()
                time.sleep(0.5)
                continue
            self.reconnects += 1
            last = self.last_channel()
            if (
                last is not None
                and int(last["treatment"]) == treatment
                and int(last["channel"]) == number
                and float(last["delivered_s"]) >= heard - 1e-6
            ):
                for done in last["dwells"]:
                    if int(done["index"]) >= progress.next_index:
                        yield DwellDone(
                            number,
                            int(done["index"]),
                            float(done["position_mm"]),
                            float(done["delivered_s"]),
                        )
                counted = float(last["delivered_s"])
                own = f" ({last['reason']})" if last.get("reason") else ""
                yield ChannelEnded(
                    number,
                    counted,
                    Termination.NORMAL if last["termination"] == "NORMAL" else Termination.MACHINE,
                    f"link lost: {cause}; the controller counted {counted:g} s{own}",
                    str(last.get("code") or "LINK"),
                    None if last.get("dwell") is None else int(last["dwell"]),
                )
                return
            never = last is None or int(last["treatment"]) < treatment
            if never and heard <= 0 and not progress.done:
                yield ChannelEnded(
                    number,
                    0.0,
                    Termination.MACHINE,
                    f"link lost: {cause}; the controller never began this channel",
                    "LINK",
                )
                return
            break
        yield ChannelEnded(
            number,
            heard,
            Termination.UNKNOWN,
            f"link lost: {cause}; the controller's count could not be confirmed",
            "LINK",
        )

    def interrupt(self, reason: str) -> None:
        """RETRACT: the source comes back at once; ``treat`` ends OPERATOR."""
        link = self.link
        if link is not None and not link.closed.is_set():
            try:
                link.send(MessageType.RETRACT, {"reason": reason})
            except LinkLost:
                self.close()


_CHANNEL_FRAMES = (MessageType.DWELL_PROGRESS, MessageType.DWELL_DONE, MessageType.CHANNEL_ENDED)


class _ChannelHeard:
    """What the host heard of one channel's treatment, and the rules each frame must keep."""

    def __init__(self, programme: ChannelProgramme, treatment: int) -> None:
        self.programme = programme
        self.treatment = treatment
        self.counted = 0.0  # the highest DWELL_PROGRESS count: source seconds, cumulative
        self.done: list[DwellDone] = []

    @property
    def heard(self) -> float:
        """The most source seconds any intact frame said: a DWELL_PROGRESS, or the
        DWELL_DONEs' sum."""
        return max(self.counted, round(sum(d.delivered_s for d in self.done), 4))

    @property
    def next_index(self) -> int:
        return len(self.done)

    def problem(self, frame: Frame) -> str:
        """How ``frame`` breaks hil/PROTOCOL.md (Afterloader), or ""."""
        body, number = frame.body, self.programme.channel
        if int(body["channel"]) != number:
            return f"{frame.type.name} for channel {body['channel']} while {number} is treated"
        if frame.type == MessageType.DWELL_PROGRESS:
            count = float(body["delivered_s"])
            if count < self.counted - 1e-6:
                return f"DWELL_PROGRESS fell from {self.counted:g} to {count:g} s"
        elif frame.type == MessageType.DWELL_DONE:
            index, dwells = int(body["index"]), self.programme.dwells
            if index != self.next_index:
                wanted = str(self.next_index) if self.next_index < len(dwells) else "none"
                return f"DWELL_DONE index {index} where {wanted} was next"
        elif int(body["treatment"]) != self.treatment:
            return f"CHANNEL_ENDED of treatment {body['treatment']}, not {self.treatment}"
        elif body["termination"] == "NORMAL" and len(self.done) != len(self.programme.dwells):
            return (
                f"CHANNEL_ENDED NORMAL after {len(self.done)} of "
                f"{len(self.programme.dwells)} dwells"
            )
        return ""

    def take(self, frame: Frame) -> AfterloaderEvent:
        body, number = frame.body, self.programme.channel
        if frame.type == MessageType.DWELL_PROGRESS:
            self.counted = max(self.counted, float(body["delivered_s"]))
            return ChannelTick(number, self.heard)
        if frame.type == MessageType.DWELL_DONE:
            event = DwellDone(
                number, int(body["index"]), float(body["position_mm"]), float(body["delivered_s"])
            )
            self.done.append(event)
            return event
        return ChannelEnded(
            number,
            max(self.heard, float(body["delivered_s"])),
            Termination(body["termination"]),
            str(body.get("reason", "")),
            str(body.get("code", "")),
            None if body.get("dwell") is None else int(body["dwell"]),
        )


REMOTE_MACHINES: dict[str, type[RemoteMachine]] = {
    "linac": RemoteDevice,
    "afterloader": RemoteAfterloader,
}


def _an(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


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


# What a performing device kind (``run --kind``, passed as the ``machine`` option) drives
# over a controller link: an afterloader, or a linac with its couch and imager.
KIND_MACHINES = {"afterloader": "afterloader", "pps": "linac", "pds": "linac", "tdd": "linac"}


def protocol_device(scheme: str):
    """The backend for one protocol-v2 scheme: ``serial:///dev/ttyUSB0?baudrate=57600&
    parity=E&rtscts=1`` (pyserial's setting names; default 115200 8N1; any pyserial URL such
    as ``serial:loop://``), ``tcp://HOST:PORT``, and pyserial's network handlers
    ``rfc2217://HOST:PORT`` (a terminal server) and ``socket://HOST:PORT`` (a raw bridge).

    The class is the machine the run's kind needs (``options["machine"]``: a device kind or
    ``linac``/``afterloader``): :class:`RemoteAfterloader` or :class:`RemoteDevice`, which
    refuses at ``connect()`` a controller of the other kind. Without a hint it is a
    :class:`RemoteMachine` that becomes the class HELLO_REPLY's ``machine`` names."""

    def factory(rest: str, clock: Clock, options: dict) -> Machine:
        opener, url = link_opener(f"{scheme}:{rest}")
        hint = str(options.get("machine") or "")
        machine = REMOTE_MACHINES.get(KIND_MACHINES.get(hint, hint), RemoteMachine)
        return machine(
            opener,
            clock,
            observer=options.get("link_observer"),
            timing_overrides=_timing(url, options),
            control=url.control,
        )

    return factory
