"""Reading a plan the way every consumer needs it: a beam by number, metersets by beam.

The delivery, the records, the scheduler's continuation and the safety checks all ask the
same two questions of an RT Plan; they ask them here so they cannot disagree.
"""

from __future__ import annotations

from pydicom.dataset import Dataset


def specified_metersets(plan: Dataset) -> dict[int, float]:
    """Beam Meterset of each referenced beam of the (single) fraction group, in MU."""
    groups = plan.get("FractionGroupSequence") or []
    return {
        int(ref.ReferencedBeamNumber): float(ref.BeamMeterset)
        for group in groups[:1]
        for ref in group.ReferencedBeamSequence
    }


def plan_beam(plan: Dataset, beam_number: int) -> Dataset:
    """The Beam Sequence item with this Beam Number."""
    for beam in plan.get("BeamSequence") or []:
        if int(beam.BeamNumber) == beam_number:
            return beam
    raise KeyError(f"beam {beam_number} is not in plan {plan.get('SOPInstanceUID', '?')}")
