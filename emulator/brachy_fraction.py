"""What is left of a brachytherapy fraction, in the plan's own terms, and how long each
dwell must last today to give it.

A plan's dwell times are for its source as calibrated (Source Sequence: Reference Air
Kerma Rate at the Source Strength Reference Date and Time). A session gives a dwell
``t`` actual seconds of a source of strength ``S(t0)`` at its treatment time ``t0``: in the
plan's terms, ``t × S(t0) / S_plan`` reference seconds. What is left is the plan's
reference seconds less those of every earlier session of the fraction, and a continuation
gives each dwell its rest as ``rest × S_plan / S(now)`` seconds of today's source. The TMS
uses this to decide whether anything is left; the afterloader, to treat exactly that.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from pydicom.dataset import Dataset

from devices.afterloader import BrachySource, ChannelProgramme, Dwell
from emulator.results.brachy_record import delivered_dwells
from emulator.synth.brachy_access import PlannedChannel, planned_channels, planned_source

# A rest shorter than this is no dwell: machines cannot time it, and it is below what a
# record's 0.1 s resolution tells apart.
NEGLIGIBLE_S = 0.05


def recorded_source(record: Dataset) -> BrachySource:
    """The source a brachy record says the machine held (Recorded Source Sequence)."""
    item = record.RecordedSourceSequence[0]
    when = f"{item.SourceStrengthReferenceDate}{str(item.SourceStrengthReferenceTime)[:6]}"
    return BrachySource(
        isotope=str(item.SourceIsotopeName),
        half_life_days=float(item.SourceIsotopeHalfLife),
        reference_air_kerma_rate=float(item.ReferenceAirKermaRate),
        reference=dt.datetime.strptime(when, "%Y%m%d%H%M%S"),
    )


def treated_at(record: Dataset) -> dt.datetime:
    """When a record's session was treated (RT General Treatment Record)."""
    when = f"{record.TreatmentDate}{str(record.TreatmentTime)[:6]}"
    return dt.datetime.strptime(when, "%Y%m%d%H%M%S")


def remaining_reference_s(plan: Dataset, records: Sequence[Dataset]) -> dict[int, list[float]]:
    """Per channel, the reference seconds each dwell still owes after ``records``
    (never negative: an over-delivery is not taken back, nor given again)."""
    planned_strength = planned_source(plan).reference_air_kerma_rate
    left = {c.channel_number: [d.time_s for d in c.dwells] for c in planned_channels(plan)}
    for record in records:
        strength = recorded_source(record).strength_at(treated_at(record))
        for channel, seconds in delivered_dwells(record).items():
            owed = left.get(channel)
            if owed is None:
                continue
            for index, given in enumerate(seconds[: len(owed)]):
                owed[index] -= given * strength / planned_strength
    return {channel: [round(max(0.0, s), 4) for s in owed] for channel, owed in left.items()}


def anything_left(remaining: dict[int, list[float]]) -> bool:
    return any(s > NEGLIGIBLE_S for owed in remaining.values() for s in owed)


def todays_programmes(
    plan: Dataset,
    remaining: dict[int, list[float]],
    source: BrachySource,
    now: dt.datetime,
) -> list[tuple[PlannedChannel, ChannelProgramme]]:
    """The channels still owed, each with its dwells' actual seconds for ``source`` at
    ``now`` (a weaker source dwells longer), in channel order; dwells already given in
    full are left out."""
    factor = planned_source(plan).reference_air_kerma_rate / source.strength_at(now)
    programmes = []
    for channel in planned_channels(plan):
        owed = remaining.get(channel.channel_number, [])
        dwells = tuple(
            Dwell(planned.index, planned.position_mm, round(owed[planned.index] * factor, 3))
            for planned in channel.dwells
            if planned.index < len(owed) and owed[planned.index] > NEGLIGIBLE_S
        )
        if dwells:
            programmes.append(
                (channel, ChannelProgramme(channel.channel_number, channel.length_mm, dwells))
            )
    return programmes
