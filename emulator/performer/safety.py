"""Checks before a UPS is claimed, so a device never starts what it cannot deliver safely.

Inputs are checked against RO-17 (Notes 8 and 9) and the plan against Appendix A and the
machine profile. Each problem names the rule it breaks. Before the claim a problem means
the UPS is left alone; after the claim, the UPS is CANCELED with the problems as reason.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from devices.base import Capabilities
from emulator.synth.plan_access import specified_metersets
from emulator.ups_references import InstanceReference, references_in


def input_problems(ups: Dataset, known_aes: set[str]) -> list[str]:
    """What is wrong with any UPS's inputs, before anything is retrieved (each step then
    checks the inputs it needs: Step.input_problems)."""
    problems = []
    if not str(ups.get("StudyInstanceUID", "")):
        problems.append("RO-17/Note-9: no Study Instance UID for the results")
    for ref in references_in(ups.get("InputInformationSequence") or []):
        if ref.retrieve_ae_title not in known_aes:
            problems.append(
                f"RO-18: input {ref.sop_instance_uid} is at unknown AE {ref.retrieve_ae_title!r}"
            )
    return problems


def arrival_problems(refs: list[InstanceReference], held: dict[str, Dataset]) -> list[str]:
    """Whether what arrived is what the Input Information Sequence promised (Note 8)."""
    problems = []
    for ref in refs:
        ds = held.get(ref.sop_instance_uid)
        if ds is None:
            problems.append(f"RO-18: input {ref.sop_instance_uid} did not arrive")
        elif str(ds.SOPClassUID) != ref.sop_class_uid:
            problems.append(
                f"RO-17/Note-8: {ref.sop_instance_uid} is {ds.SOPClassUID}, "
                f"not the promised {ref.sop_class_uid}"
            )
        elif ref.study_instance_uid and str(ds.StudyInstanceUID) != ref.study_instance_uid:
            problems.append(f"RO-17/Note-8: {ref.sop_instance_uid} is in another study")
    return problems


def plan_problems(
    plan: Dataset, instruction: Dataset, ups: Dataset, caps: Capabilities
) -> list[str]:
    """Appendix A and machine-profile checks of the plan and its delivery instruction."""
    problems = []
    if str(plan.get("PatientID", "")) != str(ups.get("PatientID", "")):
        problems.append("RO-17/Note-8: the plan belongs to another patient than the UPS")
    if plan.get("RTPlanGeometry") != "PATIENT":
        problems.append("Appendix-A/RT-General-Plan: RT Plan Geometry must be PATIENT")
    if plan.get("ApprovalStatus") != "APPROVED":
        problems.append("Appendix-A/Approval: the plan is not APPROVED")
    groups = plan.get("FractionGroupSequence") or []
    if len(groups) != 1:
        problems.append("Appendix-A/RT-Fraction-Scheme: exactly one fraction group")
    beams = plan.get("BeamSequence") or []
    if not 1 <= len(beams) <= min(100, caps.max_beams):
        problems.append(
            f"Appendix-A/RT-Beams: {len(beams)} beams (1 to {min(100, caps.max_beams)} allowed)"
        )
    for setup in plan.get("PatientSetupSequence") or []:
        if setup.get("PatientPosition") not in caps.patient_positions:
            problems.append(
                f"Appendix-A/RT-Patient-Setup: position {setup.get('PatientPosition')}"
                " not supported"
            )
    for beam in beams:
        label = f"beam {beam.BeamNumber}"
        if beam.get("RadiationType") != "PHOTON":
            problems.append(f"Appendix-A/RT-Beams: {label} is not PHOTON")
        cp0 = beam.ControlPointSequence[0]
        if float(cp0.get("NominalBeamEnergy", 0) or 0) not in caps.energies_mv:
            problems.append(f"machine: {label} energy {cp0.get('NominalBeamEnergy')} MV")
        rate = float(cp0.get("DoseRateSet", 0) or 0)
        if not caps.min_dose_rate <= rate <= caps.max_dose_rate:
            problems.append(f"machine: {label} dose rate {rate} MU/min out of range")
        for device in beam.get("BeamLimitingDeviceSequence") or []:
            if (
                device.RTBeamLimitingDeviceType.startswith("MLC")
                and int(device.NumberOfLeafJawPairs) != caps.mlc_leaf_pairs
            ):
                problems.append(
                    f"machine: {label} MLC has {device.NumberOfLeafJawPairs} leaf "
                    f"pairs, the machine {caps.mlc_leaf_pairs}"
                )
    refs = instruction.get("ReferencedRTPlanSequence") or []
    if len(refs) != 1 or refs[0].ReferencedSOPInstanceUID != plan.SOPInstanceUID:
        problems.append("RT-Beams-Delivery-Instruction: does not reference the input plan")
    numbers = {int(b.BeamNumber) for b in beams}
    specified = specified_metersets(plan)
    for task in instruction.get("BeamTaskSequence") or []:
        number = int(task.ReferencedBeamNumber)
        if number not in numbers:
            problems.append(f"RT-Beams-Delivery-Instruction: beam {number} is not in the plan")
        elif task.TreatmentDeliveryType == "CONTINUATION":
            start = float(task.get("ContinuationStartMeterset", -1))
            end = float(task.get("ContinuationEndMeterset", -1))
            if not 0 <= start < end <= specified.get(number, 0) + 1e-6:
                problems.append(
                    f"RT-Beams-Delivery-Instruction: beam {number} continuation "
                    f"range {start}-{end} is not within its meterset"
                )
    return problems


def frame_problems(plan: Dataset, planning_ct: Dataset) -> list[str]:
    """The plan must be in the frame of reference the session's images were registered in."""
    plan_frame = str(plan.get("FrameOfReferenceUID", ""))
    ct_frame = str(planning_ct.get("FrameOfReferenceUID", ""))
    if plan_frame != ct_frame:
        return [
            f"Appendix-A/A.1-Frame-of-Reference: the plan's Frame of Reference {plan_frame!r} "
            f"is not the planning CT's {ct_frame!r}; the couch correction would not apply"
        ]
    return []
