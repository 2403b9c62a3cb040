"""What an HDR afterloader is to the host: its loaded source, its limits, one channel's
programme of dwells, and the events a channel's treatment reports.

The host (the treatment console) turns the plan's dwell times, given for the plan's source
strength, into actual seconds for the source as it is today; the machine delivers those
seconds and reports what it measured, dwell by dwell. It knows nothing of DICOM.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from devices.base import Termination

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class BrachySource:
    """A sealed source as DICOM's Source Sequence gives it (PS3.3 C.8.8.15): isotope name,
    half-life in days, Reference Air Kerma Rate in µGy·h⁻¹ at 1 m at ``reference``."""

    isotope: str
    half_life_days: float
    reference_air_kerma_rate: float
    reference: dt.datetime

    def strength_at(self, when: dt.datetime) -> float:
        """The air kerma rate at ``when``, decayed from the reference (µGy·h⁻¹ at 1 m)."""
        days = (when - self.reference).total_seconds() / SECONDS_PER_DAY
        return self.reference_air_kerma_rate * 2.0 ** (-days / self.half_life_days)


@dataclass(frozen=True)
class AfterloaderLimits:
    """What the machine can treat: a plan outside these is refused before any source moves."""

    channels: int
    max_channel_length_mm: float
    min_dwell_s: float
    max_dwell_s: float
    max_dwells_per_channel: int


@dataclass(frozen=True)
class Dwell:
    """One stop of the source: ``index`` its order in the channel (0-based), ``position_mm``
    along the channel from its tip, ``time_s`` actual seconds at today's source strength."""

    index: int
    position_mm: float
    time_s: float


@dataclass(frozen=True)
class ChannelProgramme:
    """One channel to treat: its number on the machine, its length (mm) and its dwells."""

    channel: int
    length_mm: float
    dwells: tuple[Dwell, ...]

    @property
    def total_s(self) -> float:
        return round(sum(d.time_s for d in self.dwells), 4)


@dataclass(frozen=True)
class ChannelTick:
    """Source time delivered in this channel so far (actual seconds, cumulative)."""

    channel: int
    delivered_s: float


@dataclass(frozen=True)
class DwellDone:
    """The source finished dwell ``index`` and left it; ``delivered_s`` as measured."""

    channel: int
    index: int
    position_mm: float
    delivered_s: float


@dataclass(frozen=True)
class ChannelEnded:
    """The source is back in its safe; ``delivered_s`` is the channel's measured source time.

    Interrupted in a dwell (``dwell`` its index), that dwell got ``delivered_s`` minus the
    dwells done. ``code`` is the machine's own (DOOR, RETRACT, OBSTRUCTION, POWER, ...).
    """

    channel: int
    delivered_s: float
    termination: Termination
    reason: str = ""
    code: str = ""
    dwell: int | None = None


AfterloaderEvent = ChannelTick | DwellDone | ChannelEnded


class Afterloader(ABC):
    """The afterloader role: a machine that drives a sealed source through channels."""

    is_role = True
    does = "drive a brachytherapy source"

    @abstractmethod
    def source(self) -> BrachySource:
        """The source loaded in the machine now."""

    @abstractmethod
    def afterloader_limits(self) -> AfterloaderLimits: ...

    @abstractmethod
    def load_channel(self, programme: ChannelProgramme) -> None:
        """Checks and sets up one channel (raises DeviceError to refuse); nothing moves."""

    @abstractmethod
    def treat(self) -> Iterator[AfterloaderEvent]:
        """Treats the loaded channel: a check run for obstruction, the source out, each
        dwell, the source back. Always ends with :class:`ChannelEnded`."""

    @abstractmethod
    def interrupt(self, reason: str) -> None:
        """Operator hold: the source retracts at once; ``treat`` ends OPERATOR."""
