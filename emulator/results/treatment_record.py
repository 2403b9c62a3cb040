"""RT Beams Treatment Record (PS3.3 A.29) from what a device actually delivered.

The record reports, per beam and control point, the meterset that was delivered and never
more: delivered meterset is the sum over control points, and an interrupted beam records
where it stopped, so the TMS can schedule exactly the remainder as a CONTINUATION.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from devices.couch_axes import TableTop
from emulator.profile import SopClasses
from emulator.synth.common import (
    PatientContext,
    apply_equipment,
    apply_series,
    code_item,
    da,
    new_dataset,
    new_uid,
    sequence,
    sop_reference,
    tm,
)
from emulator.synth.plan_access import plan_beam, specified_metersets

TERMINATIONS = ("NORMAL", "OPERATOR", "MACHINE", "UNKNOWN")
# The machine's own termination codes (hil/PROTOCOL.md, Errors: DOSE1, DOOR, LINK, ...):
# a private coding scheme, as PS3.16 8.2 allows ("99" and the owner).
MACHINE_CODE_SCHEME = "99TDWEMU"


@dataclass(frozen=True)
class DeliveredControlPoint:
    index: int
    specified_meterset: float
    delivered_meterset: float
    dose_rate_set: float
    dose_rate_delivered: float
    gantry_angle: float
    moment: dt.datetime


@dataclass
class DeliveredBeam:
    """One beam as delivered: the control points reached and how the beam ended.

    ``termination_code`` is the machine's own code for the termination (an interlock such
    as DOSE1), written as the Machine-Specific Treatment Termination Code Sequence
    (300A,0716); ``termination_description`` its words, as Treatment Termination
    Description (300A,0730). PS3.3 retired Treatment Termination Code (3008,002B) for them.
    ``verification`` is Treatment Verification Status (3008,002C): NOT_VERIFIED, "treatment
    failed verification (one or more values out of range and not overridden)", for a beam
    whose measured meterset is off its plan beyond the machine's tolerance.
    """

    beam_number: int
    control_points: list[DeliveredControlPoint] = field(default_factory=list)
    termination: str = "NORMAL"
    delivery_type: str = "TREATMENT"
    verification: str = "VERIFIED"
    termination_code: str = ""
    termination_description: str = ""
    # Where the table top was for this beam (IEC 61217, absolute), as the couch measured it.
    table_top: TableTop | None = None

    @property
    def delivered(self) -> float:
        return round(sum(cp.delivered_meterset for cp in self.control_points), 4)


@dataclass(frozen=True)
class TreatmentMachine:
    """The machine a record names (RT Treatment Machine Record, General Equipment): what the
    machine, or its controller, says it is, not what the emulator is."""

    name: str
    manufacturer: str = "tdw-emulator"
    model: str = "simulated C-arm linac"
    serial: str = "SIM-0001"
    software: str = ""

    @classmethod
    def identified(cls, name: str, identity) -> TreatmentMachine:
        """From a ``devices.base.Identity`` (vendor, model, serial, firmware)."""
        return cls(name, identity.vendor, identity.model, identity.serial, identity.firmware)


@dataclass(frozen=True)
class RecordSession:
    """What every treatment record says of its session beyond what was delivered: the
    study the UPS supplied (RO-24), the machine, the fraction, when, and the records it
    continues."""

    study_instance_uid: str
    machine: TreatmentMachine
    fraction: int
    started: dt.datetime
    previous_records: tuple[Dataset, ...] = ()


def new_treatment_record(
    sop_class_uid: str, plan: Dataset, session: RecordSession, series_number: int, title: str
) -> Dataset:
    """The modules a beams and a brachy treatment record share (PS3.3 A.29, A.30): patient,
    study and series copied from the plan, the machine as General Equipment, RT General
    Treatment Record and RT Treatment Machine Record."""
    machine = session.machine
    ctx = PatientContext.from_dataset(plan)
    ctx.study_instance_uid = session.study_instance_uid
    ds = new_dataset(sop_class_uid)
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "RTRECORD", new_uid(), series_number, title)
    apply_equipment(ds, model=machine.model[:64], station=machine.name[:16])
    ds.Manufacturer = machine.manufacturer[:64]
    ds.DeviceSerialNumber = machine.serial[:64]
    if machine.software:
        ds.SoftwareVersions = machine.software[:64]
    # RT General Treatment Record
    ds.InstanceNumber = session.fraction
    ds.TreatmentDate = da(session.started)
    ds.TreatmentTime = tm(session.started)
    ds.ReferencedRTPlanSequence = sequence(sop_reference(plan))
    if session.previous_records:
        ds.ReferencedTreatmentRecordSequence = sequence(
            *(sop_reference(record) for record in session.previous_records)
        )
    # RT Treatment Machine Record
    treated_on = Dataset()
    treated_on.TreatmentMachineName = machine.name[:16]
    treated_on.Manufacturer = machine.manufacturer[:64]
    treated_on.InstitutionName = ""
    treated_on.ManufacturerModelName = machine.model[:64]
    treated_on.DeviceSerialNumber = machine.serial[:64]
    ds.TreatmentMachineSequence = sequence(treated_on)
    return ds


def build_treatment_record(
    plan: Dataset,
    beams: list[DeliveredBeam],
    uids: SopClasses,
    study_instance_uid: str,
    machine: TreatmentMachine | str,
    fraction_number: int,
    session_start: dt.datetime,
    operator: str = "",
    previous_records: list[Dataset] | None = None,
) -> Dataset:
    """A record of one session; ``study_instance_uid`` is the one the UPS supplied (RO-24).

    ``machine`` is the treatment machine (a bare name: the simulated linac's identity)."""
    if isinstance(machine, str):
        machine = TreatmentMachine(machine)
    for beam in beams:
        if beam.termination not in TERMINATIONS:
            raise ValueError(f"termination {beam.termination!r} not in {TERMINATIONS}")
    session = RecordSession(
        study_instance_uid, machine, fraction_number, session_start, tuple(previous_records or ())
    )
    ds = new_treatment_record(
        uids["rt_beams_treatment_record"], plan, session, 20, "Treatment record"
    )
    ds.OperatorsName = operator
    # RT Beams Session Record
    group = plan.FractionGroupSequence[0]
    ds.NumberOfFractionsPlanned = group.NumberOfFractionsPlanned
    ds.PrimaryDosimeterUnit = "MU"
    planned = {int(b.BeamNumber): b for b in plan.BeamSequence}
    specified = specified_metersets(plan)
    items = []
    for beam in beams:
        source = planned[beam.beam_number]
        item = Dataset()
        item.ReferencedBeamNumber = beam.beam_number
        item.BeamName = source.BeamName
        item.BeamType = source.BeamType
        item.RadiationType = source.RadiationType
        pairs = []
        for device in source.BeamLimitingDeviceSequence:
            pair = Dataset()
            pair.RTBeamLimitingDeviceType = device.RTBeamLimitingDeviceType
            pair.NumberOfLeafJawPairs = device.NumberOfLeafJawPairs
            pairs.append(pair)
        item.BeamLimitingDeviceLeafPairsSequence = sequence(*pairs)
        item.NumberOfWedges = 0
        item.NumberOfCompensators = 0
        item.NumberOfBoli = 0
        item.NumberOfBlocks = 0
        item.CurrentFractionNumber = fraction_number
        item.TreatmentDeliveryType = beam.delivery_type
        item.TreatmentTerminationStatus = beam.termination
        if beam.termination_code:
            item.MachineSpecificTreatmentTerminationCodeSequence = sequence(
                code_item(
                    beam.termination_code[:16],
                    MACHINE_CODE_SCHEME,
                    (beam.termination_description or beam.termination_code)[:64],
                )
            )
        if beam.termination_description:
            item.TreatmentTerminationDescription = beam.termination_description[:1024]
        item.TreatmentVerificationStatus = beam.verification
        item.SpecifiedPrimaryMeterset = specified[beam.beam_number]
        item.DeliveredPrimaryMeterset = beam.delivered
        item.NumberOfControlPoints = len(beam.control_points)
        cps = []
        for cp in beam.control_points:
            point = Dataset()
            point.ReferencedControlPointIndex = cp.index
            point.TreatmentControlPointDate = da(cp.moment)
            point.TreatmentControlPointTime = tm(cp.moment)
            point.SpecifiedMeterset = round(cp.specified_meterset, 4)
            point.DeliveredMeterset = round(cp.delivered_meterset, 4)
            point.DoseRateSet = cp.dose_rate_set
            point.DoseRateDelivered = cp.dose_rate_delivered
            point.GantryAngle = cp.gantry_angle
            point.GantryRotationDirection = "NONE"
            if beam.table_top is not None and not cps:
                _table_top(point, beam.table_top)
            cps.append(point)
        item.ControlPointDeliverySequence = sequence(*cps)
        items.append(item)
    ds.TreatmentSessionBeamSequence = sequence(*items)
    return ds


def _table_top(point: Dataset, where: TableTop) -> None:
    """The couch as it stood for the beam (PS3.3 C.8.8.21, RT Beams Session Record: the
    Control Point Delivery Sequence): IEC 61217 table-top positions (mm) and angles
    (degrees); yaw is the Patient Support Angle."""
    point.TableTopVerticalPosition = round(where.vertical_mm, 2)
    point.TableTopLongitudinalPosition = round(where.longitudinal_mm, 2)
    point.TableTopLateralPosition = round(where.lateral_mm, 2)
    point.PatientSupportAngle = round(where.yaw_deg % 360, 3)
    point.PatientSupportRotationDirection = "NONE"
    point.TableTopPitchAngle = round(where.pitch_deg, 3)
    point.TableTopPitchRotationDirection = "NONE"
    point.TableTopRollAngle = round(where.roll_deg, 3)
    point.TableTopRollRotationDirection = "NONE"


def delivered_as_planned(
    plan: Dataset, beam_number: int, fraction: float = 1.0, start: dt.datetime | None = None
) -> DeliveredBeam:
    """A beam delivered along its plan up to ``fraction`` of its meterset (for tests, demos)."""
    total = specified_metersets(plan)[beam_number]
    beam = plan_beam(plan, beam_number)
    cps = beam.ControlPointSequence
    final = float(beam.FinalCumulativeMetersetWeight)
    moment = start or dt.datetime.now().replace(microsecond=0)
    dose_rate = float(cps[0].DoseRateSet)
    gantry = float(cps[0].GantryAngle)
    reached = []
    delivered_so_far = 0.0
    limit = total * fraction
    for index in range(len(cps) - 1):
        segment = (
            total
            * (
                float(cps[index + 1].CumulativeMetersetWeight)
                - float(cps[index].CumulativeMetersetWeight)
            )
            / final
        )
        given = max(0.0, min(segment, limit - delivered_so_far))
        reached.append(
            DeliveredControlPoint(index, segment, given, dose_rate, dose_rate, gantry, moment)
        )
        delivered_so_far += given
        if given < segment:
            break
    termination = "NORMAL" if fraction >= 1.0 else "MACHINE"
    return DeliveredBeam(beam_number, reached, termination)
