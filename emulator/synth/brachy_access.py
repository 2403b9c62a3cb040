"""Reading an HDR brachytherapy RT Plan the way every consumer needs it: its source, its
channels and their dwells, and whether the plan holds together.

PS3.3 C.8.8.15 (RT Brachy Application Setups) gives each channel a Channel Total Time
(seconds, for the source at its Source Strength Reference Date and Time) and a Brachy
Control Point Sequence of positions and cumulative time weights. For a STEPWISE channel a
dwell is a pair of control points at the same position; its time is the channel's total
times the pair's weight difference over the Final Cumulative Time Weight. The afterloader,
the record, the TMS's continuation and the integrity check all derive dwells here, so they
cannot disagree.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass

from pydicom.dataset import Dataset

from devices.afterloader import BrachySource

# Two totals that must agree if the data arrived intact: the setup's Total Reference Air
# Kerma against the source strength times the channels' times (relative), and a channel's
# positions against its length (mm).
TOTAL_KERMA_TOLERANCE = 0.005
POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class PlannedDwell:
    """Dwell ``index`` (0-based, in channel order) at ``position_mm`` (Control Point Relative
    Position), starting at control point ``control_point_index``; ``time_s`` in seconds
    of the plan's source at its reference strength."""

    index: int
    control_point_index: int
    position_mm: float
    time_s: float


@dataclass(frozen=True)
class PlannedChannel:
    channel_number: int
    length_mm: float
    total_time_s: float
    source_number: int
    dwells: tuple[PlannedDwell, ...]


def is_brachy_plan(plan: Dataset) -> bool:
    """An RT Plan with brachy application setups (and so no beams to deliver)."""
    return bool(plan.get("ApplicationSetupSequence")) or "BrachyTreatmentType" in plan


def _moment(date: str, time: str) -> dt.datetime:
    return dt.datetime.strptime(f"{date}{str(time)[:6].ljust(6, '0')}", "%Y%m%d%H%M%S")


def planned_source(plan: Dataset, source_number: int | None = None) -> BrachySource:
    """The plan's source (the first, or ``source_number``) as calibrated."""
    items = plan.SourceSequence
    item = next(
        (s for s in items if source_number is None or int(s.SourceNumber) == source_number),
        items[0],
    )
    return BrachySource(
        isotope=str(item.SourceIsotopeName),
        half_life_days=float(item.SourceIsotopeHalfLife),
        reference_air_kerma_rate=float(item.ReferenceAirKermaRate),
        reference=_moment(item.SourceStrengthReferenceDate, item.SourceStrengthReferenceTime),
    )


def _dwells(channel: Dataset) -> tuple[PlannedDwell, ...]:
    points = list(channel.BrachyControlPointSequence)
    total = float(channel.ChannelTotalTime)
    final = float(channel.get("FinalCumulativeTimeWeight") or 0) or float(
        points[-1].CumulativeTimeWeight or 0
    )
    dwells = []
    for first in range(0, len(points) - 1, 2):
        a, b = points[first], points[first + 1]
        weight = float(b.CumulativeTimeWeight) - float(a.CumulativeTimeWeight)
        time_s = round(total * weight / final, 4) if final else 0.0
        dwells.append(
            PlannedDwell(len(dwells), first, float(a.ControlPointRelativePosition), time_s)
        )
    return tuple(dwells)


def planned_channels(plan: Dataset) -> list[PlannedChannel]:
    """Every channel of every application setup, in channel-number order."""
    channels = [
        PlannedChannel(
            channel_number=int(channel.ChannelNumber),
            length_mm=float(channel.ChannelLength or 0),
            total_time_s=float(channel.ChannelTotalTime),
            source_number=int(channel.ReferencedSourceNumber),
            dwells=_dwells(channel),
        )
        for setup in plan.get("ApplicationSetupSequence") or []
        for channel in setup.ChannelSequence
    ]
    return sorted(channels, key=lambda c: c.channel_number)


def _channel_problems(channel: Dataset, sources: set[int]) -> list[str]:
    """One channel against itself: the pairs a STEPWISE channel must be made of, weights
    that never fall and end at the final weight, positions inside the channel."""
    name = f"channel {channel.get('ChannelNumber', '?')}"
    points = list(channel.get("BrachyControlPointSequence") or [])
    problems = []
    if int(channel.get("ReferencedSourceNumber", -1)) not in sources:
        problems.append(f"{name} references a source the plan does not hold")
    if str(channel.get("SourceMovementType", "")) != "STEPWISE":
        problems.append(f"{name} is {channel.get('SourceMovementType')}: only STEPWISE is treated")
    if int(channel.get("NumberOfControlPoints", -1)) != len(points):
        problems.append(
            f"{name} says {channel.get('NumberOfControlPoints')} control points and holds "
            f"{len(points)}"
        )
    if not points or len(points) % 2:
        problems.append(f"{name}: {len(points)} control points are not pairs of dwells")
        return problems
    if [int(p.ControlPointIndex) for p in points] != list(range(len(points))):
        problems.append(f"{name}: control point indices are not 0..{len(points) - 1} in order")
    weights = [float(p.CumulativeTimeWeight or 0) for p in points]
    if weights[0] != 0 or any(b < a for a, b in itertools.pairwise(weights)):
        problems.append(f"{name}: cumulative time weights do not rise from 0")
    final = float(channel.get("FinalCumulativeTimeWeight") or weights[-1])
    if abs(weights[-1] - final) > 1e-6 * max(1.0, final):
        problems.append(
            f"{name}: the last cumulative weight {weights[-1]:g} is not the final weight {final:g}"
        )
    length = float(channel.get("ChannelLength") or 0)
    for first in range(0, len(points), 2):
        a, b = points[first], points[first + 1]
        where = float(a.ControlPointRelativePosition)
        if abs(where - float(b.ControlPointRelativePosition)) > POSITION_TOLERANCE_MM:
            problems.append(f"{name}: control points {first} and {first + 1} are no dwell pair")
        if first and float(points[first - 1].CumulativeTimeWeight) != float(a.CumulativeTimeWeight):
            problems.append(f"{name}: time weight grows while the source moves to {where:g} mm")
        if length and not 0 <= where <= length + POSITION_TOLERANCE_MM:
            problems.append(f"{name}: dwell at {where:g} mm is outside its {length:g} mm")
    if float(channel.get("ChannelTotalTime") or 0) <= 0:
        problems.append(f"{name}: Channel Total Time is not positive")
    return problems


def plan_integrity_problems(plan: Dataset) -> list[str]:
    """What does not hold together in the plan, in words (empty: intact). Beyond each
    channel's own structure, the setup's Total Reference Air Kerma must equal the source
    strength times the channels' total times (µGy at 1 m = µGy·h⁻¹ × h): a dwell time
    changed or lost on the way shows here."""
    sources = {int(s.SourceNumber): s for s in plan.get("SourceSequence") or []}
    setups = plan.get("ApplicationSetupSequence") or []
    if not sources:
        return ["the plan holds no Source Sequence"]
    if not setups:
        return ["the plan holds no Application Setup Sequence"]
    problems = []
    for setup in setups:
        channels = list(setup.get("ChannelSequence") or [])
        if not channels:
            problems.append(f"application setup {setup.get('ApplicationSetupNumber')}: no channels")
            continue
        numbers = [int(c.ChannelNumber) for c in channels]
        if len(set(numbers)) != len(numbers):
            problems.append(f"channel numbers repeat: {numbers}")
        for channel in channels:
            problems.extend(_channel_problems(channel, set(sources)))
        stated = setup.get("TotalReferenceAirKerma")
        if stated is None:
            problems.append("the application setup has no Total Reference Air Kerma")
            continue
        computed = sum(
            float(sources[int(c.ReferencedSourceNumber)].ReferenceAirKermaRate)
            * float(c.ChannelTotalTime)
            / 3600.0
            for c in channels
            if int(c.get("ReferencedSourceNumber", -1)) in sources
        )
        if abs(float(stated) - computed) > TOTAL_KERMA_TOLERANCE * max(computed, 1e-9):
            problems.append(
                f"Total Reference Air Kerma {float(stated):g} µGy is not the source's "
                f"strength times the channel times ({computed:.4g} µGy)"
            )
    return problems
