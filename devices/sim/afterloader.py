"""A simulated HDR afterloader: dwell programmes corrected for source decay.

Dwell times are planned at a reference activity; the source has decayed since, so each
dwell lasts reference_time x 2^(days since reference / half-life). The meterset it reports
is in reference seconds delivered, which stays comparable with the plan whatever the date.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

from devices.base import (
    BeamEnded,
    BeamProgram,
    Capabilities,
    DeliveryEvent,
    Device,
    DeviceError,
    DwellProgramme,
    DwellReached,
    Identity,
    ImageSet,
    MetersetTick,
    Termination,
)
from devices.clock import Clock
from devices.couch_axes import TableTop


class SimulatedAfterloader(Device):
    def __init__(self, profile: dict[str, Any], clock: Clock, today: dt.date | None = None) -> None:
        self.profile = profile
        self.clock = clock
        self.today = today or dt.date.today()
        self._programme: DwellProgramme | None = None
        self._hold = threading.Event()
        self._connected = False

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def identify(self) -> Identity:
        i = self.profile["identity"]
        return Identity(i["vendor"], i["model"], i["serial"], str(i["firmware"]))

    def capabilities(self) -> Capabilities:
        return Capabilities((), 0.0, 0.0, 0, 0, (), 0.0, 0.0, 0.0)

    @property
    def decay_factor(self) -> float:
        """Dwell-time multiplier: how much weaker the source is than at its reference date."""
        source = self.profile["source"]
        reference = dt.date.fromisoformat(str(source["reference_date"]))
        days = (self.today - reference).days
        return 2 ** (days / float(source["half_life_days"]))

    def load_dwell_programme(self, programme: DwellProgramme) -> None:
        if not self._connected:
            raise DeviceError("device is not connected")
        p = self.profile
        per_channel: dict[int, int] = {}
        for dwell in programme.positions:
            if not 1 <= dwell.channel <= int(p["channels"]):
                raise DeviceError(f"channel {dwell.channel} does not exist")
            per_channel[dwell.channel] = per_channel.get(dwell.channel, 0) + 1
            actual = dwell.reference_time_s * self.decay_factor
            if not 0 < actual <= float(p["max_dwell_time_s"]):
                raise DeviceError(
                    f"dwell of {actual:.1f} s in channel {dwell.channel} "
                    "is outside the machine's limits"
                )
        if any(n > int(p["max_dwell_positions_per_channel"]) for n in per_channel.values()):
            raise DeviceError("too many dwell positions in one channel")
        self._programme = programme
        self._hold.clear()
        self.clock.reset()

    def treat(self) -> Iterator[DeliveryEvent]:
        programme, self._programme = self._programme, None
        if programme is None:
            raise DeviceError("no dwell programme loaded")
        factor = self.decay_factor
        transfer = float(self.profile["timing"]["transfer_s"])
        delivered = 0.0
        channel = None
        for dwell in programme.positions:
            if dwell.channel != channel:
                channel = dwell.channel
                self.clock.sleep(transfer)
            actual = dwell.reference_time_s * factor
            if not self.clock.sleep(actual) or self._hold.is_set():
                yield BeamEnded(round(delivered, 4), Termination.OPERATOR, "source retracted")
                return
            delivered += dwell.reference_time_s
            yield DwellReached(dwell.channel, dwell.position_mm, round(actual, 4))
            yield MetersetTick(round(delivered, 4), 0.0)
        yield BeamEnded(round(delivered, 4), Termination.NORMAL)

    def interrupt(self, reason: str) -> None:
        self._hold.set()
        self.clock.wake()

    def load_beam(self, beam: BeamProgram) -> None:
        raise DeviceError("an afterloader delivers dwell programmes, not external beams")

    def beam_on(self) -> Iterator[DeliveryEvent]:
        raise DeviceError("an afterloader delivers dwell programmes, not external beams")

    def move_couch(self, move: TableTop) -> TableTop:
        raise DeviceError("an afterloader has no couch")

    def acquire(self, kind: str) -> ImageSet:
        raise DeviceError("an afterloader has no imager")
