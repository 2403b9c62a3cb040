"""What an RT Brachy Treatment Record must hold together (rule RO-24/Brachy-record):
it references the RT Plan it treated, and each recorded channel's Delivered Channel Total
Time is the sum of its dwells (the time between each pair of Brachy Control Point
Delivered items), its control points pairs of the plan's at the plan's positions.

The device's own records are judged by it in the scenarios, and any record by
``tdw-emu validate``; a TMS schedules continuations from these numbers, so a record whose
totals disagree with its dwells would have it deliver too much or too little.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from emulator.results.brachy_record import delivered_dwells
from emulator.synth.brachy_access import planned_channels

TOTAL_TOLERANCE_S = 0.1
POSITION_TOLERANCE_MM = 0.1


def _plan_problems(record: Dataset, plan: Dataset | None, plan_class: str) -> list[str]:
    refs = record.get("ReferencedRTPlanSequence") or []
    if len(refs) != 1:
        return [f"Referenced RT Plan Sequence holds {len(refs)} items, not 1"]
    ref = refs[0]
    problems = []
    if str(ref.get("ReferencedSOPClassUID", "")) != plan_class:
        problems.append(f"it references a {ref.get('ReferencedSOPClassUID')}, not an RT Plan")
    if plan is not None and str(ref.get("ReferencedSOPInstanceUID", "")) != str(
        plan.SOPInstanceUID
    ):
        problems.append(
            f"it references plan {ref.get('ReferencedSOPInstanceUID')}, not the plan treated "
            f"({plan.SOPInstanceUID})"
        )
    return problems


def _channel_problems(channel: Dataset, dwells: list[float], planned: dict) -> list[str]:
    number = int(channel.ChannelNumber)
    name = f"channel {number}"
    points = list(channel.get("BrachyControlPointDeliveredSequence") or [])
    problems = []
    if int(channel.get("NumberOfControlPoints", -1)) != len(points):
        problems.append(
            f"{name}: Number of Control Points {channel.get('NumberOfControlPoints')} but "
            f"{len(points)} items"
        )
    if len(points) % 2:
        problems.append(f"{name}: {len(points)} delivered control points are not dwell pairs")
    total = float(channel.get("DeliveredChannelTotalTime") or 0)
    if abs(total - sum(dwells)) > TOTAL_TOLERANCE_S:
        problems.append(
            f"{name}: Delivered Channel Total Time {total:g} s is not the sum of its dwells "
            f"({sum(dwells):.3f} s)"
        )
    plan_channel = planned.get(number)
    if planned and plan_channel is None:
        problems.append(f"{name} is not a channel of the plan")
    for first in range(0, len(points) - 1, 2):
        a, b = points[first], points[first + 1]
        index = int(a.ReferencedControlPointIndex)
        if index % 2 or int(b.ReferencedControlPointIndex) != index + 1:
            problems.append(
                f"{name}: items {first}, {first + 1} reference control points {index}, "
                f"{b.ReferencedControlPointIndex}: not a dwell's pair"
            )
            continue
        if plan_channel is None:
            continue
        dwell = next((d for d in plan_channel.dwells if d.control_point_index == index), None)
        if dwell is None:
            problems.append(f"{name}: control point {index} is not in the plan")
        elif abs(float(a.ControlPointRelativePosition) - dwell.position_mm) > POSITION_TOLERANCE_MM:
            problems.append(
                f"{name}: dwell {dwell.index} recorded at {a.ControlPointRelativePosition} mm, "
                f"planned at {dwell.position_mm:g} mm"
            )
    return problems


def brachy_record_problems(
    record: Dataset, plan_class: str, plan: Dataset | None = None
) -> list[str]:
    """Each way ``record`` fails the rule, in words (empty: it holds together); with
    ``plan``, also against the plan it treated."""
    problems = _plan_problems(record, plan, plan_class)
    planned = {c.channel_number: c for c in planned_channels(plan)} if plan is not None else {}
    try:
        dwells = delivered_dwells(record)
    except (ValueError, AttributeError, TypeError) as exc:
        return [*problems, f"its delivered control points cannot be read: {exc}"]
    for setup in record.get("TreatmentSessionApplicationSetupSequence") or []:
        for channel in setup.get("RecordedChannelSequence") or []:
            problems += _channel_problems(
                channel, dwells.get(int(channel.ChannelNumber), []), planned
            )
    return problems
