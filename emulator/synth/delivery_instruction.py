"""RT Beams Delivery Instruction: what the TMS hands a delivery device for one session.

Its SOP Class UID is the one that changed between Supplement 74's draft and the final
standard, so it comes from the selected UID set. CONTINUATION tasks carry the meterset
range still to deliver, so a resumed beam never re-delivers what was already given.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from emulator.profile import SopClasses
from emulator.synth.common import (
    PatientContext,
    apply_equipment,
    apply_series,
    new_dataset,
    new_uid,
    sequence,
    sop_reference,
)


@dataclass(frozen=True)
class ContinuationRange:
    """Meterset range of one beam still to deliver after an interruption."""

    start: float
    end: float


def build_delivery_instruction(
    ctx: PatientContext,
    plan: Dataset,
    uids: SopClasses,
    fraction_number: int = 1,
    continuations: dict[int, ContinuationRange] | None = None,
    omitted_beams: dict[int, str] | None = None,
) -> Dataset:
    """One BeamTask per beam to deliver.

    ``continuations`` maps beam numbers to the meterset range still to deliver;
    ``omitted_beams`` maps beam numbers to a free-text reason, recorded as
    ALREADY_TREATED (PS3.3 C.8.8.29 defined term) with the text as its description.
    """
    continuations = continuations or {}
    omitted_beams = omitted_beams or {}
    ds = new_dataset(uids["rt_beams_delivery_instruction"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "PLAN", new_uid(), 10, "Delivery instruction")
    apply_equipment(ds, model="tdw-emulator reference TMS")
    ds.InstanceNumber = fraction_number
    ref_plan = sop_reference(plan)
    ds.ReferencedRTPlanSequence = sequence(ref_plan)

    group_number = plan.FractionGroupSequence[0].FractionGroupNumber
    tasks = []
    order = 0
    for beam in plan.BeamSequence:
        number = int(beam.BeamNumber)
        if number in omitted_beams:
            continue
        task = Dataset()
        task.BeamTaskType = "TREAT"
        task.PrimaryDosimeterUnit = beam.PrimaryDosimeterUnit
        if number in continuations:
            task.TreatmentDeliveryType = "CONTINUATION"
            task.ContinuationStartMeterset = continuations[number].start
            task.ContinuationEndMeterset = continuations[number].end
        else:
            task.TreatmentDeliveryType = "TREATMENT"
        task.CurrentFractionNumber = fraction_number
        task.ReferencedFractionGroupNumber = group_number
        task.ReferencedBeamNumber = number
        order += 1
        task.BeamOrderIndex = order
        task.AutosequenceFlag = "NO"
        tasks.append(task)
    ds.BeamTaskSequence = sequence(*tasks)
    if omitted_beams:
        omitted = []
        for number, reason in omitted_beams.items():
            item = Dataset()
            item.ReferencedFractionGroupNumber = group_number
            item.ReferencedBeamNumber = number
            item.ReasonForOmission = "ALREADY_TREATED"
            item.ReasonForOmissionDescription = reason[:64]
            omitted.append(item)
        ds.OmittedBeamTaskSequence = sequence(*omitted)
    return ds
