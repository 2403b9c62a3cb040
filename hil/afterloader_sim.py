"""The afterloader controller of protocol v2 (hil/PROTOCOL.md, Afterloader), for
``tdw-emu hil controller-sim --machine afterloader``.

The machine is devices.sim.afterloader.SimulatedAfterloader itself: its check run, source
transfer, dwells and steps at the configured time scale, and its faults (door, power, a
stuck source, an obstructed catheter) as the control channel sets them (hil/faults.py).
This module only puts it on the wire, on the linac controller's serving code (a pty, a
TCP socket, the wire faults, the silent-host watchdog): what the machine measured goes out
as DWELL_PROGRESS, DWELL_DONE and CHANNEL_ENDED, the door as DOOR, and a host lost with the
source out has the source retracted at once and the channel ended MACHINE, code LINK, with
the seconds counted, kept for the next HELLO_REPLY (``last_channel``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import asdict

from devices.afterloader import ChannelEnded, ChannelProgramme, ChannelTick, DwellDone
from devices.base import DeviceError, Termination
from devices.clock import Clock
from devices.link import Link, LinkLost
from devices.protocol import PROTOCOL_VERSION, MessageType
from devices.remote import channel_from_body
from devices.sim.afterloader import AfterloaderFaults, SimulatedAfterloader
from devices.sim.linac import load_machine_profile
from devices.timing import TimingBudget
from hil.controller_sim import QUIRKS, ControllerSim
from hil.faults import DOOR_OPEN_S, Faults

# DWELL_PROGRESS at least this often (wall-clock seconds) from CHANNEL_STARTED to
# CHANNEL_ENDED, whatever the machine's own tick at the time scale: the check run and the
# source's transit count no seconds, and the host must still hear the channel is alive.
TICK_S = 0.2


class _Run:
    """One channel's treatment on the machine: what the host is told and what was measured."""

    def __init__(self, record: dict, out_from: float | None) -> None:
        self.record = record  # the controller's own count: last_channel in HELLO_REPLY
        self.out_from = out_from  # when the source leaves its safe (monotonic), None: never
        self.quiet = threading.Event()  # the host is gone: nothing more goes on its link
        self.cause: tuple[str, str] | None = None  # the controller's own retraction: code, why
        self.thread: threading.Thread | None = None


class AfterloaderControllerSim(ControllerSim):
    """An afterloader behind the protocol. ``channels`` is every treatment as the machine
    measured it, in order (the rig's ground truth, in the control channel's status)."""

    def __init__(
        self,
        machine: str = "afterloader",
        time_scale: float = 1.0,
        faults: Faults | None = None,
        quirks: frozenset[str] = frozenset(),
    ) -> None:
        if quirks:
            raise ValueError(
                f"--break {sorted(quirks)}: the deliberately broken variants ({sorted(QUIRKS)}) "
                "are the linac controller's"
            )
        self.quirks = frozenset()
        self.profile = load_machine_profile(machine)
        self.time_scale = time_scale
        self.clock = Clock(time_scale)
        self.faults = faults or Faults()
        self.timing = TimingBudget(tick_s=TICK_S)
        self.afterloader = SimulatedAfterloader(self.profile, self.clock)
        self.afterloader.connect()
        self.sessions = 0
        self.door = "closed"
        self.channels: list[dict] = []
        self._loaded: ChannelProgramme | None = None
        self._run: _Run | None = None
        self._link: Link | None = None
        self._door_lock = threading.Lock()

    # -- the control channel ---------------------------------------------------------------

    def report(self) -> dict:
        return {
            "sessions": self.sessions,
            "door": self.door,
            "channels": [{**c, "dwells": list(c["dwells"])} for c in self.channels],
        }

    def place_patient(self, command: dict) -> dict:
        return {"ok": False, "error": "an afterloader images no patient"}

    # -- requests --------------------------------------------------------------------------

    def _hello_body(self) -> dict:
        limits = self.afterloader.afterloader_limits()
        ended = [c for c in self.channels if c["termination"]]
        last = {**ended[-1], "dwells": list(ended[-1]["dwells"])} if ended else None
        return {
            "protocol": PROTOCOL_VERSION,
            "machine": "afterloader",
            "identity": asdict(self.afterloader.identify()),
            "capabilities": asdict(limits),
            "timing": self.timing.as_body(),
            "last_channel": last,
        }

    def _source_status(self) -> dict:
        source = self.afterloader.source()
        return {
            "isotope": source.isotope,
            "half_life_days": source.half_life_days,
            "reference_air_kerma_rate": source.reference_air_kerma_rate,
            "reference_datetime": source.reference.isoformat(timespec="seconds"),
            "source_position": "out" if self._source_out() else "safe",
            "door": self.door,
        }

    def handle(self, link: Link, kind: MessageType, body: dict) -> None:
        """Answers one request at once: LOAD_CHANNEL moves nothing, and a channel's
        treatment runs on its own thread, so HELLO, HEARTBEAT, GET_SOURCE_STATUS and RETRACT
        are answered while the source is out."""
        self._link = link
        try:
            if kind == MessageType.HELLO:
                self._abort_delivery("a new session (HELLO) began with the source out")
                self.sessions += 1
                self._loaded = None  # a new session finds nothing loaded
                link.send(MessageType.HELLO_REPLY, self._hello_body())
            elif kind == MessageType.HEARTBEAT:
                state = "treating" if self._treating() else "idle"
                link.send(MessageType.HEARTBEAT_REPLY, {"state": state, "sessions": self.sessions})
            elif kind == MessageType.GET_SOURCE_STATUS:
                link.send(MessageType.SOURCE_STATUS, self._source_status())
            elif kind == MessageType.LOAD_CHANNEL:
                self._load(link, body)
            elif kind == MessageType.TREAT:
                self._treat(link)
            elif kind in (MessageType.RETRACT, MessageType.INTERRUPT):
                if self._treating():
                    self.afterloader.interrupt(str(body.get("reason", "")))
            else:
                self._error(link, "UNSUPPORTED", f"an afterloader does not take {kind.name}", kind)
        except DeviceError as exc:
            self._error(link, "LIMIT", str(exc), kind)
        except (KeyError, TypeError, ValueError) as exc:
            self._error(link, "BAD_REQUEST", f"{type(exc).__name__}: {exc}", kind)

    def _load(self, link: Link, body: dict) -> None:
        if self._treating():
            self._error(link, "BUSY", "a channel is being treated", MessageType.LOAD_CHANNEL)
            return
        self._loaded = None  # a refused LOAD_CHANNEL leaves nothing loaded
        programme = channel_from_body(body)
        given = {"interlocks": self.faults.interlocks}
        given["afterloader_faults"] = self.faults.afterloader_faults
        self.afterloader.faults = AfterloaderFaults.from_options(given)
        self.afterloader.load_channel(programme)  # DeviceError: outside the machine's limits
        self._loaded = programme
        link.send(
            MessageType.LOADED,
            {
                "channel": programme.channel,
                "treatment": len(self.channels) + 1,
                "dwells": len(programme.dwells),
                "total_s": programme.total_s,
            },
        )

    def _treat(self, link: Link) -> None:
        if self._treating():
            self._error(link, "BUSY", "a channel is being treated", MessageType.TREAT)
            return
        if self._loaded is None:
            self._error(link, "NOT_LOADED", "no channel is loaded", MessageType.TREAT)
            return
        if self.door == "open":
            self._error(link, "INTERLOCK", "the treatment room door is open", MessageType.TREAT)
            return
        programme, self._loaded = self._loaded, None  # loaded for one TREAT only
        record = {
            "treatment": len(self.channels) + 1,
            "channel": programme.channel,
            "delivered_s": 0.0,
            "termination": "",
            "code": "",
            "reason": "",
            "dwell": None,
            "dwells": [],
        }
        self.channels.append(record)
        check_run = float(self.profile["timing"]["check_run_s"]) * self.time_scale
        obstructed = programme.channel in self.afterloader.faults.obstructed
        run = _Run(record, None if obstructed else time.monotonic() + check_run)
        run.thread = threading.Thread(
            target=self._run_channel, args=(link, programme, run), daemon=True
        )
        self._run = run
        try:
            link.send(
                MessageType.CHANNEL_STARTED,
                {"channel": programme.channel, "treatment": record["treatment"]},
            )
        except LinkLost:  # the host vanished before the source moved: so the channel ends
            record.update(
                termination="MACHINE",
                code="LINK",
                reason="the host was lost before the channel began; the source stayed in its safe",
            )
            raise
        run.thread.start()

    # -- a channel's treatment -------------------------------------------------------------

    def _treating(self) -> bool:
        """From CHANNEL_STARTED until the channel ended (its CHANNEL_ENDED may still be on
        its way: a LOAD_CHANNEL the host sends on reading it is not BUSY)."""
        run = self._run
        alive = run is not None and run.thread is not None and run.thread.is_alive()
        return alive and not run.record["termination"]

    def _source_out(self) -> bool:
        run = self._run
        return self._treating() and run.out_from is not None and time.monotonic() >= run.out_from

    def _run_channel(self, link: Link, programme: ChannelProgramme, run: _Run) -> None:
        """The machine treats the channel on a thread of its own; this one tells the host, in
        order: DWELL_PROGRESS as the machine counts (the latest only, when counts queue up,
        and at least every TICK_S), DOOR, DWELL_DONE, and CHANNEL_ENDED last."""
        events: queue.Queue = queue.Queue()

        def machine() -> None:
            for event in self.afterloader.treat():
                events.put(event)

        threading.Thread(target=machine, daemon=True, name="afterloader").start()
        number, record = programme.channel, run.record
        door_at = self._door_opens_at(number)
        last_sent, told = time.monotonic(), 0.0

        def send(kind: MessageType, body: dict) -> None:
            nonlocal last_sent, told
            while self.faults.stalled and not run.quiet.is_set():
                time.sleep(0.05)
            if run.quiet.is_set():
                return
            try:
                link.send(kind, body)
                last_sent = time.monotonic()
                if kind == MessageType.DWELL_PROGRESS:
                    told = body["delivered_s"]
            except LinkLost:
                self._lose_host(run, "the host was lost (no ACK) with the source out")

        def counted() -> None:
            """The count so far goes before a frame that depends on it (a coalesced one)."""
            if record["delivered_s"] > told:
                send(MessageType.DWELL_PROGRESS, self._progress(record))

        while True:
            try:
                event = events.get(timeout=TICK_S / 4)
            except queue.Empty:
                if time.monotonic() - last_sent >= TICK_S / 2:
                    send(MessageType.DWELL_PROGRESS, self._progress(record))
                continue
            if isinstance(event, ChannelTick):
                record["delivered_s"] = event.delivered_s
                opens = door_at is not None and event.delivered_s >= door_at - 1e-9
                if events.empty() or opens:  # coalesced: a later count is already queued
                    send(MessageType.DWELL_PROGRESS, self._progress(record))
                if opens and self.door == "closed":
                    self._open_door(number, send)
            elif isinstance(event, DwellDone):
                done = {
                    "index": event.index,
                    "position_mm": event.position_mm,
                    "delivered_s": event.delivered_s,
                }
                record["dwells"].append(done)
                counted()
                send(MessageType.DWELL_DONE, {"channel": number, **done})
            elif isinstance(event, ChannelEnded):
                by_door = event.code == "DOOR" or (
                    event.code == "RETRACT" and "door" in event.reason
                )
                counted()
                if by_door and self.door == "closed":  # opened before any second was counted
                    self._open_door(number, send)
                self._end(record, event, run)
                if event.code in ("DOOR", "POWER", "RETRACT", "OBSTRUCTION"):
                    self._fault_spent(number)
                send(MessageType.CHANNEL_ENDED, {k: v for k, v in record.items() if k != "dwells"})
                return

    def _fault_spent(self, channel: int) -> None:
        """A fault of the channel happened: it happens once, as in the in-process
        simulation (the door is closed again, the catheter cleared, the power back), so
        the continuation the TMS schedules can treat."""
        faults = self.faults.afterloader_faults
        for kind in ("door", "power", "stuck"):
            table = faults.get(kind)
            if isinstance(table, dict):
                table.pop(channel, None)
                table.pop(str(channel), None)
        if isinstance(faults.get("obstructed"), list):
            faults["obstructed"] = [c for c in faults["obstructed"] if int(c) != channel]
        self.faults.interlocks.pop(channel, None)

    def _progress(self, record: dict) -> dict:
        return {"channel": record["channel"], "delivered_s": record["delivered_s"]}

    def _end(self, record: dict, event: ChannelEnded, run: _Run) -> None:
        """The machine's end of the channel as the controller reports it: a retraction the
        controller made itself (its host lost) is MACHINE with its code, not OPERATOR."""
        termination, code, reason = event.termination, event.code, event.reason
        if run.cause is not None and termination == Termination.OPERATOR:
            termination, (code, reason) = Termination.MACHINE, run.cause
        record.update(
            delivered_s=event.delivered_s,
            termination=termination.value,
            code=code,
            reason=reason,
            dwell=event.dwell,
        )

    def _lose_host(self, run: _Run, why: str) -> None:
        """hil/PROTOCOL.md, Afterloader (losing the host): the source retracts at once and
        the channel ends MACHINE, code LINK, with the seconds counted."""
        if run.cause is None:
            run.cause = ("LINK", why)
        run.quiet.set()
        self.afterloader.interrupt(why)

    def _abort_delivery(self, why: str = "the host was lost with the source out") -> None:
        run = self._run
        if run is None or run.thread is None:
            return
        if self._treating():
            self._lose_host(run, f"{why}; the source was retracted")
        else:
            run.quiet.set()  # ended: its CHANNEL_ENDED is the old session's, if still going
        run.thread.join(timeout=10)

    # -- the door --------------------------------------------------------------------------

    def _door_opens_at(self, channel: int) -> float | None:
        """Seconds into ``channel`` at which a door fault opens the door, if the door (not
        the power) is what stops it."""
        faults = self.afterloader.faults
        door, power = faults.door.get(channel), faults.power.get(channel)
        if door is None or (power is not None and power < door):
            return None
        return door

    def _open_door(self, channel: int, send) -> None:
        """The door opens (DOOR before the CHANNEL_ENDED it causes) and closes again after
        the fault's ``open_s`` device seconds (DOOR again)."""
        with self._door_lock:
            self.door = "open"
        send(MessageType.DOOR, {"door": "open"})
        opened = self.faults.afterloader_faults.get("door_open_s", {})
        seconds = float(dict(opened).get(channel, DOOR_OPEN_S))
        timer = threading.Timer(seconds * self.time_scale, self._close_door)
        timer.daemon = True
        timer.start()

    def _close_door(self) -> None:
        with self._door_lock:
            self.door = "closed"
        link = self._link
        if link is not None and not link.closed.is_set():
            with contextlib.suppress(LinkLost):
                link.send(MessageType.DOOR, {"door": "closed"})
