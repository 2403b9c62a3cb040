"""Fault injection for the controller simulator, driven through a control channel.

Faults act where real rigs break: on the wire (garbled, duplicated or reordered frames,
latency and jitter, an unplugged cable) and in the controller (an interlock at a given
meterset, a stall; for an afterloader, the door, the power, a stuck source, an obstructed
catheter). The control channel is a line-oriented JSON socket on loopback, so a test or an
operator can inject them while a session runs, as lewis does for its devices.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.control_channel import send_command
from devices.couch_axes import ROTATIONS, TRANSLATIONS

COUCH_AXES = TRANSLATIONS + ROTATIONS
# The afterloader's faults, by devices.sim.afterloader.AfterloaderFaults' names: channel ->
# seconds of source time into it (door, power), channel -> seconds the source stays out
# (stuck), channels whose check run stops (obstructed).
AFTERLOADER_FAULTS = ("door", "power", "stuck", "obstructed")
DOOR_OPEN_S = 5.0  # how long (device seconds) a door opened by a fault stays open


@dataclass
class Faults:
    garble_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    stall_until: float = 0.0
    unplugged_until: float = 0.0
    drop_requested: bool = False
    # A linac: beam -> meterset (MU) at which an interlock trips. An afterloader: channel ->
    # seconds of source time into it at which the door opens (AfterloaderFaults' interlocks).
    interlocks: dict[int, float] = field(default_factory=dict)
    # An afterloader's other faults, as AfterloaderFaults.from_options takes them:
    # {"door": {channel: s}, "power": {channel: s}, "stuck": {channel: s}, "obstructed":
    # [channel, ...], "door_open_s": {channel: s}}.
    afterloader_faults: dict[str, object] = field(default_factory=dict)
    # An axis that stops short: gantry or collimator (degrees), or a couch axis as
    # couch_lateral_mm ... couch_yaw_deg (mm or degrees).
    axis_faults: dict[str, float] = field(default_factory=dict)
    overrun_mu: float = 0.0  # a beam runs this far past its end, and says so
    overrun_beam: int | None = None  # that beam only (None: every beam)
    seed: int = 1
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.lock = threading.Lock()

    def count(self, name: str) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self.stall_until

    @property
    def unplugged(self) -> bool:
        return time.monotonic() < self.unplugged_until

    def apply(self, command: dict) -> dict:
        """One control-channel command; returns the reply."""
        kind = command.get("fault")
        now = time.monotonic()
        if kind == "interlock":  # a beam at a meterset, or an afterloader channel at seconds
            unit = command["beam"] if "beam" in command else command["channel"]
            at = command["meterset"] if "meterset" in command else command["seconds"]
            self.interlocks[int(unit)] = float(at)
        elif kind in AFTERLOADER_FAULTS:
            return self._afterloader_fault(kind, command)
        elif kind in ("garble", "duplicate", "reorder"):
            setattr(self, f"{kind}_rate", float(command.get("rate", 1.0)))
        elif kind == "latency":
            self.latency_ms = float(command.get("ms", 0))
            self.jitter_ms = float(command.get("jitter_ms", 0))
        elif kind == "stall":
            self.stall_until = now + float(command.get("seconds", 5))
        elif kind == "unplug":
            self.unplugged_until = now + float(command.get("seconds", 3))
        elif kind == "stuck_axis":
            self.axis_faults[str(command["axis"])] = float(command.get("short_by", 5.0))
        elif kind == "couch_short":
            axis = str(command["axis"])
            if axis not in COUCH_AXES:
                return {"ok": False, "error": f"couch axis {axis!r}: one of {COUCH_AXES}"}
            self.axis_faults[f"couch_{axis}"] = float(command.get("by", 10.0))
        elif kind == "overrun":
            self.overrun_mu = float(command.get("mu", 2.0))
            self.overrun_beam = int(command["beam"]) if "beam" in command else None
        elif kind == "drop":
            self.drop_requested = True
        elif kind == "clear":
            self.garble_rate = self.duplicate_rate = self.reorder_rate = 0.0
            self.latency_ms = self.jitter_ms = 0.0
            self.stall_until = self.unplugged_until = 0.0
            self.interlocks.clear()
            self.axis_faults.clear()
            self.overrun_mu = 0.0
            self.afterloader_faults.clear()
        elif kind == "status":
            pass
        else:
            return {"ok": False, "error": f"unknown fault {kind!r}"}
        return {"ok": True, "counters": dict(self.counters)}

    def _afterloader_fault(self, kind: str, command: dict) -> dict:
        """``{"fault": "door" | "power", "channel": c, "seconds": s}`` (s seconds of source
        time into channel c; a door also ``"open_s"``, how long it stays open), ``{"fault":
        "stuck", "channel": c, "seconds": s}`` (the source stays out s seconds more before
        the emergency retraction), ``{"fault": "obstructed", "channel": c}``."""
        channel = int(command["channel"])
        faults = self.afterloader_faults
        if kind == "obstructed":
            faults.setdefault("obstructed", [])
            if channel not in faults["obstructed"]:
                faults["obstructed"].append(channel)
        else:
            seconds = float(command.get("seconds", 3.0 if kind == "stuck" else 0.0))
            if seconds < 0:
                return {"ok": False, "error": f"{kind}: seconds must be 0 or more"}
            faults.setdefault(kind, {})[channel] = seconds
            if kind == "door":
                opened = float(command.get("open_s", DOOR_OPEN_S))
                faults.setdefault("door_open_s", {})[channel] = opened
        return {"ok": True, "counters": dict(self.counters)}


class FaultyTransport:
    """Wraps the controller's transport and applies the wire faults to what it sends."""

    def __init__(self, inner, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self._held: bytes | None = None

    def read(self, size: int) -> bytes:
        data = self.inner.read(size)
        if data and (self.faults.unplugged or self.faults.stalled):
            self.faults.count("read_discarded")
            return b""
        return data

    def write(self, data: bytes) -> None:
        f = self.faults
        if f.unplugged or f.stalled:
            f.count("write_discarded")
            return
        if f.latency_ms or f.jitter_ms:
            time.sleep((f.latency_ms + f.rng.uniform(0, f.jitter_ms)) / 1000)
        if f.garble_rate and f.rng.random() < f.garble_rate and len(data) > 2:
            broken = bytearray(data)
            broken[f.rng.randrange(len(broken) - 1)] ^= 1 << f.rng.randrange(8)
            data = bytes(broken)
            f.count("garbled")
        if f.reorder_rate and self._held is None and f.rng.random() < f.reorder_rate:
            self._held = data  # sent after the next frame
            f.count("reordered")
            return
        self.inner.write(data)
        if f.duplicate_rate and f.rng.random() < f.duplicate_rate:
            self.inner.write(data)
            f.count("duplicated")
        if self._held is not None:
            held, self._held = self._held, None
            self.inner.write(held)

    def close(self) -> None:
        self.inner.close()


class ControlChannel:
    """JSON lines on 127.0.0.1: each line a command, each answered with one line."""

    def __init__(
        self,
        faults: Faults,
        host: str = "127.0.0.1",
        port: int = 0,
        report: Callable[[], dict] | None = None,
        commands: dict[str, Callable[[dict], dict]] | None = None,
    ) -> None:
        self.faults = faults
        self.report = report  # the controller's own state, added to every status reply
        # What the controller does besides faults: {"command": NAME, ...} lines, e.g. the
        # host's place_patient.
        self.commands = dict(commands or {})
        self.server = socket.create_server((host, port))
        self.address = self.server.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="faults")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rw") as stream:
                for line in stream:
                    try:
                        command = json.loads(line)
                        name = command.get("command")
                        if name is not None:
                            handler = self.commands.get(str(name))
                            reply = (
                                handler(command)
                                if handler
                                else {"ok": False, "error": f"unknown command {name!r}"}
                            )
                            stream.write(json.dumps(reply) + "\n")
                            stream.flush()
                            continue
                        reply = self.faults.apply(command)
                        if command.get("fault") == "status" and self.report:
                            reply["controller"] = self.report()
                    except (ValueError, KeyError, TypeError) as exc:
                        reply = {"ok": False, "error": str(exc)}
                    stream.write(json.dumps(reply) + "\n")
                    stream.flush()

    def close(self) -> None:
        self.server.close()


def send_fault(address: tuple[str, int], command: dict, timeout: float = 5.0) -> dict:
    """Client side of the control channel: one command, one reply."""
    return send_command(address, command, timeout)
