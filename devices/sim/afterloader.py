"""A simulated HDR afterloader: a source that decays, channels it drives the source through,
and the faults a real one has (door, a source that will not retract, an obstructed
catheter, a power loss), described by profiles/machines/afterloader.yaml.

Each channel's treatment is what the machine does: a check cable runs the channel for
obstruction, the source travels out, stops at each dwell for its time, and returns to the
safe. What it reports is what it measured: the seconds the source spent at dwell
positions, dwell by dwell, never the times it was asked for.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from devices.afterloader import (
    Afterloader,
    AfterloaderEvent,
    AfterloaderLimits,
    BrachySource,
    ChannelEnded,
    ChannelProgramme,
    ChannelTick,
    DwellDone,
)
from devices.base import DeviceError, Identity, Machine, Termination
from devices.clock import Clock
from devices.sim.brachy_source import loaded_source


@dataclass
class AfterloaderFaults:
    """Faults to inject, by channel (what a rig's control channel sets on a controller).

    ``door``: channel -> seconds of source time into it when the door opens;
    ``stuck``: channel -> seconds the source stays out after it should retract (at the end
    of the channel, or at its door interlock) before the emergency retraction brings it
    back; ``obstructed``: channels whose check run stops; ``power``: channel -> seconds into
    it when the power fails (the source retracts on the backup battery).

    Each fault happens once, as the linac's interlocks do: the door is closed again, the
    catheter cleared, the power back, so the continuation the TMS schedules can run.
    """

    door: dict[int, float] = field(default_factory=dict)
    stuck: dict[int, float] = field(default_factory=dict)
    obstructed: set[int] = field(default_factory=set)
    power: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> AfterloaderFaults:
        """``interlocks`` ({channel: seconds}, as ``run --interrupt CHANNEL:SECONDS``) opens
        the door; ``afterloader_faults`` gives the rest by name."""
        given = dict(options.get("afterloader_faults") or {})
        door = {int(k): float(v) for k, v in (options.get("interlocks") or {}).items()}
        door.update({int(k): float(v) for k, v in given.get("door", {}).items()})
        return cls(
            door=door,
            stuck={int(k): float(v) for k, v in given.get("stuck", {}).items()},
            obstructed={int(c) for c in given.get("obstructed", ())},
            power={int(k): float(v) for k, v in given.get("power", {}).items()},
        )


class SimulatedAfterloader(Machine, Afterloader):
    def __init__(
        self,
        profile: dict[str, Any],
        clock: Clock,
        faults: AfterloaderFaults | None = None,
        now: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        self.profile = profile
        self.clock = clock
        self.faults = faults or AfterloaderFaults()
        self.now = now
        self._programme: ChannelProgramme | None = None
        self._hold = threading.Event()
        self._hold_reason = ""
        self._connected = False

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def identify(self) -> Identity:
        i = self.profile["identity"]
        return Identity(i["vendor"], i["model"], i["serial"], str(i["firmware"]))

    def source(self) -> BrachySource:
        return loaded_source(self.profile, self.now())

    def afterloader_limits(self) -> AfterloaderLimits:
        p = self.profile
        return AfterloaderLimits(
            channels=int(p["channels"]),
            max_channel_length_mm=float(p["max_channel_length_mm"]),
            min_dwell_s=float(p["min_dwell_time_s"]),
            max_dwell_s=float(p["max_dwell_time_s"]),
            max_dwells_per_channel=int(p["max_dwell_positions_per_channel"]),
        )

    def load_channel(self, programme: ChannelProgramme) -> None:
        if not self._connected:
            raise DeviceError("device is not connected")
        limits = self.afterloader_limits()
        number = programme.channel
        if not 1 <= number <= limits.channels:
            raise DeviceError(f"channel {number} does not exist (1..{limits.channels})")
        if not 0 < programme.length_mm <= limits.max_channel_length_mm:
            raise DeviceError(
                f"channel {number}: length {programme.length_mm:g} mm beyond the machine's "
                f"{limits.max_channel_length_mm:g} mm"
            )
        if not programme.dwells or len(programme.dwells) > limits.max_dwells_per_channel:
            raise DeviceError(
                f"channel {number}: {len(programme.dwells)} dwells "
                f"(1..{limits.max_dwells_per_channel})"
            )
        for dwell in programme.dwells:
            if not limits.min_dwell_s <= dwell.time_s <= limits.max_dwell_s:
                raise DeviceError(
                    f"channel {number}: a dwell of {dwell.time_s:.1f} s is outside the "
                    f"machine's {limits.min_dwell_s:g}..{limits.max_dwell_s:g} s"
                )
            if not 0 <= dwell.position_mm <= programme.length_mm:
                raise DeviceError(f"channel {number}: dwell at {dwell.position_mm:g} mm")
        self._programme = programme
        self._hold.clear()
        self.clock.reset()

    def treat(self) -> Iterator[AfterloaderEvent]:
        programme, self._programme = self._programme, None
        if programme is None:
            raise DeviceError("no channel loaded")
        timing = self.profile["timing"]
        number = programme.channel
        if not self.clock.sleep(float(timing["check_run_s"])) or self._hold.is_set():
            yield self._ended(number, 0.0, None)
            return
        if number in self.faults.obstructed:
            self.faults.obstructed.discard(number)
            yield ChannelEnded(
                number, 0.0, Termination.MACHINE,
                "catheter obstruction: the check cable did not reach the channel's end; "
                "the source stayed in its safe", "OBSTRUCTION",
            )  # fmt: skip
            return
        self.clock.sleep(float(timing["transfer_s"]))
        tick = float(timing["tick_s"])
        delivered = 0.0  # source seconds at dwell positions in this channel
        stop_at, stop = self._first_stop(number)
        for dwell in programme.dwells:
            if dwell.index and not self.clock.sleep(float(timing["step_s"])):
                yield self._ended(number, delivered, dwell.index)
                return
            spent = 0.0
            while spent < dwell.time_s - 1e-9:
                step = min(tick, dwell.time_s - spent, stop_at - delivered)
                if step > 0:
                    if not self.clock.sleep(step) or self._hold.is_set():
                        yield self._ended(number, delivered, dwell.index)
                        return
                    spent += step
                    delivered += step
                    yield ChannelTick(number, round(delivered, 4))
                if stop is not None and delivered >= stop_at - 1e-9:
                    yield self._machine_stop(number, delivered, dwell.index, stop)
                    return
            yield DwellDone(number, dwell.index, dwell.position_mm, round(spent, 4))
        stuck = self.faults.stuck.pop(number, None)
        if stuck:
            last = programme.dwells[-1]
            self.clock.sleep(stuck)  # the source sits at the last dwell until pulled back
            yield ChannelTick(number, round(delivered + stuck, 4))
            yield ChannelEnded(
                number, round(delivered + stuck, 4), Termination.MACHINE,
                f"the source failed to retract; emergency retraction after {stuck:g} s at "
                f"{last.position_mm:g} mm", "RETRACT", last.index,
            )  # fmt: skip
            return
        self.clock.sleep(float(timing["transfer_s"]))
        yield ChannelEnded(number, round(delivered, 4), Termination.NORMAL)

    def _first_stop(self, number: int) -> tuple[float, str | None]:
        """When, in source seconds into channel ``number``, a fault stops it, and which."""
        tables = {"door": self.faults.door, "power": self.faults.power}
        stops = [(table[number], name) for name, table in tables.items() if number in table]
        return min(stops) if stops else (float("inf"), None)

    def _fired(self, number: int, why: str) -> None:
        {"door": self.faults.door, "power": self.faults.power}[why].pop(number, None)

    def _machine_stop(self, number: int, delivered: float, dwell: int, why: str) -> ChannelEnded:
        """The door opened or the power failed at ``delivered`` seconds: the source retracts
        (a stuck source first stays out its seconds more, measured)."""
        self._fired(number, why)
        stuck = self.faults.stuck.pop(number, 0.0)
        if why == "door":
            reason, code = "treatment room door opened", "DOOR"
        else:
            reason, code = "power lost; the source retracted on the backup battery", "POWER"
        if stuck:
            self.clock.sleep(stuck)
            reason += f"; the source failed to retract, emergency retraction after {stuck:g} s"
            code = "RETRACT"
        return ChannelEnded(
            number, round(delivered + stuck, 4), Termination.MACHINE, reason, code, dwell
        )

    def _ended(self, number: int, delivered: float, dwell: int | None) -> ChannelEnded:
        """An operator hold (or a wake of the clock): the source retracts at once."""
        return ChannelEnded(
            number, round(delivered, 4), Termination.OPERATOR,
            self._hold_reason or "source retracted", "", dwell,
        )  # fmt: skip

    def arm_interlock(self, channel: int, seconds: float) -> None:
        """The door opens ``seconds`` of source time into ``channel`` (once), as the
        linac's ``arm_interlock`` trips its dosimetry: a soak's --fault-rate uses both."""
        self.faults.door[int(channel)] = float(seconds)

    def interrupt(self, reason: str) -> None:
        self._hold_reason = reason
        self._hold.set()
        self.clock.wake()
