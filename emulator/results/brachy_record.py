"""RT Brachy Treatment Record (PS3.3 A.30) from what an afterloader measured, dwell by dwell.

Each delivered dwell is a pair of Brachy Control Point Delivered items that reference the
plan's pair (control points 2k and 2k+1 of a STEPWISE channel); their Cumulative Time
Weights are the channel's delivered seconds before and after the dwell, so a dwell's
delivered time is the pair's difference and the channel's Delivered Channel Total Time is
their sum. A dwell never reached has no items: the record holds what was given, never
more, and the TMS schedules exactly the rest from it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from devices.afterloader import BrachySource
from emulator.profile import SopClasses
from emulator.results.treatment_record import (
    MACHINE_CODE_SCHEME,
    TERMINATIONS,
    RecordSession,
    TreatmentMachine,
    new_treatment_record,
)
from emulator.synth.common import (
    code_item,
    da,
    sequence,
    tm,
)

SECONDS_PER_HOUR = 3600.0
# Worst first: the setup's termination is its worst channel's.
_SEVERITY = {"NORMAL": 0, "OPERATOR": 1, "MACHINE": 2, "UNKNOWN": 3}


@dataclass(frozen=True)
class DeliveredDwell:
    """Dwell ``index`` of its channel (its plan pair starts at ``control_point_index``), at
    ``position_mm``; ``specified_s`` and ``delivered_s`` are actual seconds of the source
    as it was in the session, the latter as the machine measured it."""

    index: int
    control_point_index: int
    position_mm: float
    specified_s: float
    delivered_s: float
    moment: dt.datetime


@dataclass
class DeliveredChannel:
    """One channel as treated: its dwells reached and how it ended (the machine's code)."""

    channel_number: int
    length_mm: float
    specified_s: float
    dwells: list[DeliveredDwell] = field(default_factory=list)
    termination: str = "NORMAL"
    termination_code: str = ""
    termination_description: str = ""

    @property
    def delivered_s(self) -> float:
        return round(sum(d.delivered_s for d in self.dwells), 4)


@dataclass(frozen=True)
class BrachySession:
    """What a record says of its session beyond the channels: where and when it was
    treated, which fraction, with which source, and the records it continues."""

    study_instance_uid: str
    machine: TreatmentMachine
    fraction: int
    started: dt.datetime
    source: BrachySource
    delivery_type: str = "TREATMENT"
    previous_records: tuple[Dataset, ...] = ()


def _decimal(value: float) -> str:
    """A DS of at most 16 characters."""
    return f"{value:.4f}".rstrip("0").rstrip(".") or "0"


def _recorded_source(plan: Dataset, source: BrachySource) -> Dataset:
    """The source the machine held (Recorded Source Sequence), as calibrated."""
    planned = plan.SourceSequence[0]
    item = Dataset()
    item.SourceNumber = int(planned.SourceNumber)
    item.SourceType = str(planned.SourceType)
    item.SourceManufacturer = str(planned.get("SourceManufacturer", ""))
    item.SourceSerialNumber = ""
    item.SourceIsotopeName = source.isotope
    item.SourceIsotopeHalfLife = _decimal(source.half_life_days)
    item.SourceStrengthUnits = "AIR_KERMA_RATE"
    item.ReferenceAirKermaRate = _decimal(source.reference_air_kerma_rate)
    item.SourceStrengthReferenceDate = da(source.reference)
    item.SourceStrengthReferenceTime = tm(source.reference)
    return item


def _precise_time(moment: dt.datetime) -> str:
    """A TM to the microsecond (HHMMSS.FFFFFF): a dwell's seconds are its items' difference."""
    return moment.strftime("%H%M%S.%f")


def _control_points(channel: DeliveredChannel) -> list[Dataset]:
    """Two items per dwell: the source arrived (control point 2k) and left (2k+1), at the
    moments that make the pair's difference the seconds the machine measured there."""
    items, previous = [], None
    for dwell in sorted(channel.dwells, key=lambda d: d.index):
        length = dt.timedelta(seconds=dwell.delivered_s)
        arrived = dwell.moment - length
        if previous is not None and arrived < previous:  # a faster clock than the wall's
            arrived = previous
        left = previous = arrived + length
        for offset, moment in ((0, arrived), (1, left)):
            point = Dataset()
            point.ReferencedControlPointIndex = dwell.control_point_index + offset
            point.TreatmentControlPointDate = da(moment)
            point.TreatmentControlPointTime = _precise_time(moment)
            point.ControlPointRelativePosition = _decimal(dwell.position_mm)
            items.append(point)
    return items


def _recorded_channel(channel: DeliveredChannel, planned: Dataset, source_number: int) -> Dataset:
    item = Dataset()
    item.ChannelNumber = channel.channel_number
    item.ChannelLength = _decimal(channel.length_mm)
    item.SpecifiedChannelTotalTime = _decimal(channel.specified_s)
    item.DeliveredChannelTotalTime = _decimal(channel.delivered_s)
    item.SourceMovementType = "STEPWISE"
    applicator = Dataset()
    applicator.ReferencedSourceApplicatorNumber = planned.get("SourceApplicatorNumber", 1)
    applicator.SourceApplicatorID = str(planned.get("SourceApplicatorID", ""))
    applicator.SourceApplicatorType = str(planned.get("SourceApplicatorType", ""))
    applicator.SourceApplicatorLength = planned.get("SourceApplicatorLength", "")
    applicator.SourceApplicatorStepSize = planned.get("SourceApplicatorStepSize", "")
    item.RecordedSourceApplicatorSequence = sequence(applicator)
    item.TransferTubeNumber = planned.get("TransferTubeNumber", "")
    if item.TransferTubeNumber is not None and item.TransferTubeNumber != "":
        item.TransferTubeLength = planned.get("TransferTubeLength", "")
    item.ReferencedSourceNumber = source_number
    points = _control_points(channel)
    item.NumberOfControlPoints = len(points)
    item.BrachyControlPointDeliveredSequence = sequence(*points)
    return item


def _termination(channels: list[DeliveredChannel]) -> DeliveredChannel:
    """The channel whose ending the setup reports: the worst, the first among equals."""
    return max(channels, key=lambda c: _SEVERITY[c.termination])


def build_brachy_treatment_record(
    plan: Dataset,
    channels: list[DeliveredChannel],
    uids: SopClasses,
    session: BrachySession,
) -> Dataset:
    """A record of one session. Channels that gave no source time are left out of the
    Recorded Channel Sequence, but their ending is the session's if it is the worst.
    Raises ValueError if no channel gave any (there is nothing to record)."""
    for channel in channels:
        if channel.termination not in TERMINATIONS:
            raise ValueError(f"termination {channel.termination!r} not in {TERMINATIONS}")
    given = [c for c in channels if c.dwells]
    if not given:
        raise ValueError("no channel delivered any source time: there is no record to make")
    ds = new_treatment_record(
        uids["rt_brachy_treatment_record"],
        plan,
        RecordSession(
            session.study_instance_uid,
            session.machine,
            session.fraction,
            session.started,
            session.previous_records,
        ),
        21,
        "Brachy treatment record",
    )
    # RT Brachy Session Record
    group = plan.FractionGroupSequence[0]
    ds.ReferencedFractionGroupNumber = int(group.FractionGroupNumber)
    ds.NumberOfFractionsPlanned = group.NumberOfFractionsPlanned
    ds.BrachyTreatmentTechnique = plan.BrachyTreatmentTechnique
    ds.BrachyTreatmentType = plan.BrachyTreatmentType
    recorded = _recorded_source(plan, session.source)
    ds.RecordedSourceSequence = sequence(recorded)
    planned_setup = plan.ApplicationSetupSequence[0]
    setup = Dataset()
    setup.ApplicationSetupType = planned_setup.ApplicationSetupType
    setup.ApplicationSetupName = str(planned_setup.get("ApplicationSetupName", ""))
    setup.ReferencedBrachyApplicationSetupNumber = int(planned_setup.ApplicationSetupNumber)
    strength = session.source.strength_at(session.started)
    kerma = sum(c.delivered_s for c in given) * strength / SECONDS_PER_HOUR
    setup.TotalReferenceAirKerma = _decimal(kerma)
    setup.CurrentFractionNumber = session.fraction
    setup.TreatmentDeliveryType = session.delivery_type
    ending = _termination(channels)
    setup.TreatmentTerminationStatus = ending.termination
    if ending.termination_code:
        setup.MachineSpecificTreatmentTerminationCodeSequence = sequence(
            code_item(
                ending.termination_code[:16],
                MACHINE_CODE_SCHEME,
                (ending.termination_description or ending.termination_code)[:64],
            )
        )
    if ending.termination_description:
        setup.TreatmentTerminationDescription = ending.termination_description[:1024]
    setup.TreatmentVerificationStatus = "VERIFIED"
    planned_channels = {int(c.ChannelNumber): c for c in planned_setup.ChannelSequence}
    setup.RecordedChannelSequence = sequence(
        *(
            _recorded_channel(c, planned_channels[c.channel_number], int(recorded.SourceNumber))
            for c in given
        )
    )
    ds.TreatmentSessionApplicationSetupSequence = sequence(setup)
    return ds


def _moment(point: Dataset) -> dt.datetime:
    time = str(point.TreatmentControlPointTime)
    whole, _, fraction = time.partition(".")
    moment = dt.datetime.strptime(f"{point.TreatmentControlPointDate}{whole[:6]}", "%Y%m%d%H%M%S")
    return moment + dt.timedelta(seconds=float(f"0.{fraction or 0}"))


def delivered_dwells(record: Dataset) -> dict[int, list[float]]:
    """Per channel, the seconds each dwell got (list index = dwell index, from the plan's
    control point pair 2k, 2k+1; a dwell without items got 0): the time between the
    pair's items, as :func:`build_brachy_treatment_record` writes them."""
    delivered: dict[int, list[float]] = {}
    for setup in record.get("TreatmentSessionApplicationSetupSequence") or []:
        for channel in setup.get("RecordedChannelSequence") or []:
            points = list(channel.get("BrachyControlPointDeliveredSequence") or [])
            seconds = delivered.setdefault(int(channel.ChannelNumber), [])
            for first in range(0, len(points) - 1, 2):
                index = int(points[first].ReferencedControlPointIndex) // 2
                given = (_moment(points[first + 1]) - _moment(points[first])).total_seconds()
                seconds.extend([0.0] * (index + 1 - len(seconds)))
                seconds[index] = round(seconds[index] + given, 4)
    return delivered


def delivered_channel_times(record: Dataset) -> dict[int, float]:
    """Delivered Channel Total Time of each recorded channel (seconds)."""
    return {
        int(channel.ChannelNumber): float(channel.DeliveredChannelTotalTime)
        for setup in record.get("TreatmentSessionApplicationSetupSequence") or []
        for channel in setup.get("RecordedChannelSequence") or []
    }
