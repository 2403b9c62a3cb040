"""RT Plan: photon beams with jaws and MLC, one fraction group, patient setup, approval.

STATIC beams have two control points, as Appendix A asks of geometric plans. DYNAMIC
beams are sliding-window IMRT: the MLC window sweeps across a conformal aperture over
many control points while the cumulative meterset weight rises linearly, which is what a
performing device must follow beam by beam.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from pydicom.dataset import Dataset

from emulator.profile import SopClasses
from emulator.synth.common import (
    PatientContext,
    apply_equipment,
    apply_series,
    da,
    new_dataset,
    new_uid,
    sequence,
    sop_reference,
    tm,
)
from emulator.synth.phantom import PhantomGeometry
from emulator.synth.structures import ROIS

# A 60-pair MLC: 10 x 10 mm, 40 x 5 mm, 10 x 10 mm (the common 120-leaf layout).
LEAF_BOUNDARIES: tuple[float, ...] = tuple(
    [-200.0 + 10 * k for k in range(10)]
    + [-100.0 + 5 * k for k in range(40)]
    + [100.0 + 10 * k for k in range(11)]
)
SLIDING_WINDOW_WIDTH = 10.0
APERTURE_MARGIN = 5.0


@dataclass(frozen=True)
class PlanSpec:
    """What the plan holds; every field can be set from ``tdw-emu seed``."""

    beams: int = 4
    dynamic_beams: int = 2
    control_points: int = 20
    fractions: int = 30
    dose_per_fraction_gy: float = 2.0
    machine_name: str = "TDW_LINAC1"
    energy_mv: float = 6.0
    dose_rate: float = 600.0
    meterset_per_beam: float = 100.0
    label: str = "TDW_PLAN"

    def __post_init__(self) -> None:
        if not 1 <= self.beams <= 100:
            raise ValueError("a plan holds 1 to 100 beams (Appendix A: up to 100)")
        if not 0 <= self.dynamic_beams <= self.beams:
            raise ValueError("dynamic beams must be between 0 and the number of beams")
        if self.dynamic_beams and self.control_points < 3:
            raise ValueError("a DYNAMIC beam needs at least 3 control points")
        if self.fractions < 1 or self.dose_per_fraction_gy <= 0 or self.meterset_per_beam <= 0:
            raise ValueError("fractions, dose per fraction and meterset must be positive")

    @property
    def prescription_gy(self) -> float:
        return round(self.fractions * self.dose_per_fraction_gy, 4)


def _half_widths(radius: float) -> list[float]:
    """Half-opening of each leaf pair conforming to a circle of ``radius`` (0 = closed)."""
    widths = []
    for low, high in itertools.pairwise(LEAF_BOUNDARIES):
        centre = (low + high) / 2
        widths.append(round(math.sqrt(radius**2 - centre**2), 1) if abs(centre) < radius else 0.0)
    return widths


def _mlc_positions(half_widths: list[float], fraction: float | None, jaw: float) -> list[float]:
    """Bank A then bank B positions; ``fraction`` in [0, 1] places a sliding window."""
    bank_a, bank_b = [], []
    for hw in half_widths:
        if hw == 0.0:
            # Closed pairs park under the X1 jaw so no radiation passes between them.
            bank_a.append(-jaw)
            bank_b.append(-jaw)
            continue
        if fraction is None:
            a, b = -hw, hw
        else:
            lead = -hw + (2 * hw + SLIDING_WINDOW_WIDTH) * fraction
            b = min(hw, lead)
            a = max(-hw, lead - SLIDING_WINDOW_WIDTH)
            a = min(a, b)
        bank_a.append(round(a, 2))
        bank_b.append(round(b, 2))
    return bank_a + bank_b


def _device_positions(jaw: float, mlc: list[float] | None) -> list[Dataset]:
    items = []
    for device, positions in (("ASYMX", [-jaw, jaw]), ("ASYMY", [-jaw, jaw]), ("MLCX", mlc)):
        if positions is None:
            continue
        item = Dataset()
        item.RTBeamLimitingDeviceType = device
        item.LeafJawPositions = positions
        items.append(item)
    return items


def _control_point(
    index: int,
    weight: float,
    mlc: list[float],
    jaw: float,
    *,
    first: bool,
    gantry: float,
    spec: PlanSpec,
    isocenter: tuple[float, float, float],
) -> Dataset:
    cp = Dataset()
    cp.ControlPointIndex = index
    cp.CumulativeMetersetWeight = round(weight, 6)
    if first:
        cp.NominalBeamEnergy = spec.energy_mv
        cp.DoseRateSet = spec.dose_rate
        cp.BeamLimitingDevicePositionSequence = sequence(*_device_positions(jaw, mlc))
        cp.GantryAngle = gantry
        cp.GantryRotationDirection = "NONE"
        cp.BeamLimitingDeviceAngle = 0.0
        cp.BeamLimitingDeviceRotationDirection = "NONE"
        cp.PatientSupportAngle = 0.0
        cp.PatientSupportRotationDirection = "NONE"
        cp.TableTopEccentricAngle = 0.0
        cp.TableTopEccentricRotationDirection = "NONE"
        cp.TableTopVerticalPosition = None
        cp.TableTopLongitudinalPosition = None
        cp.TableTopLateralPosition = None
        cp.IsocenterPosition = list(isocenter)
    else:
        mlc_item = Dataset()
        mlc_item.RTBeamLimitingDeviceType = "MLCX"
        mlc_item.LeafJawPositions = mlc
        cp.BeamLimitingDevicePositionSequence = sequence(mlc_item)
    ref = Dataset()
    ref.ReferencedDoseReferenceNumber = 1
    ref.CumulativeDoseReferenceCoefficient = round(weight, 6)
    cp.ReferencedDoseReferenceSequence = sequence(ref)
    return cp


def _beam(number: int, spec: PlanSpec, geometry: PhantomGeometry, dynamic: bool) -> Dataset:
    gantry = round((360.0 * (number - 1) / spec.beams) % 360.0, 1)
    radius = geometry.ptv_radius + APERTURE_MARGIN
    jaw = math.ceil(radius + APERTURE_MARGIN)
    half_widths = _half_widths(radius)

    beam = Dataset()
    beam.BeamNumber = number
    beam.BeamName = f"B{number:02d}_G{int(gantry):03d}"
    beam.BeamDescription = ("sliding-window IMRT" if dynamic else "conformal") + f" {gantry} deg"
    beam.BeamType = "DYNAMIC" if dynamic else "STATIC"
    beam.RadiationType = "PHOTON"
    beam.PrimaryDosimeterUnit = "MU"
    beam.TreatmentMachineName = spec.machine_name
    beam.SourceAxisDistance = 1000.0
    devices = []
    for device, pairs in (("ASYMX", 1), ("ASYMY", 1), ("MLCX", len(LEAF_BOUNDARIES) - 1)):
        item = Dataset()
        item.RTBeamLimitingDeviceType = device
        item.NumberOfLeafJawPairs = pairs
        if device == "MLCX":
            item.LeafPositionBoundaries = list(LEAF_BOUNDARIES)
        devices.append(item)
    beam.BeamLimitingDeviceSequence = sequence(*devices)
    beam.ReferencedPatientSetupNumber = 1
    beam.TreatmentDeliveryType = "TREATMENT"
    beam.NumberOfWedges = 0
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    beam.FinalCumulativeMetersetWeight = 1.0

    count = spec.control_points if dynamic else 2
    cps = []
    for index in range(count):
        fraction = index / (count - 1)
        mlc = _mlc_positions(half_widths, fraction if dynamic else None, jaw)
        cps.append(
            _control_point(
                index,
                fraction,
                mlc,
                jaw,
                first=index == 0,
                gantry=gantry,
                spec=spec,
                isocenter=geometry.isocenter,
            )
        )
    beam.NumberOfControlPoints = count
    beam.ControlPointSequence = sequence(*cps)
    return beam


def build_plan(
    ctx: PatientContext,
    geometry: PhantomGeometry,
    structure_set: Dataset,
    spec: PlanSpec,
    uids: SopClasses,
) -> Dataset:
    ds = new_dataset(uids["rt_plan"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "RTPLAN", new_uid(), 3, "Synthetic plan")
    ctx.apply_frame_of_reference(ds)
    apply_equipment(ds)
    ds.InstanceNumber = 1
    # RT General Plan
    ds.RTPlanLabel = spec.label
    ds.RTPlanName = "Synthetic IMRT"
    ds.RTPlanDescription = f"{spec.beams} photon beams, {spec.dynamic_beams} dynamic"
    ds.RTPlanDate = da(ctx.created)
    ds.RTPlanTime = tm(ctx.created)
    ds.RTPlanGeometry = "PATIENT"
    ref_ss = sop_reference(structure_set)
    ds.ReferencedStructureSetSequence = sequence(ref_ss)
    # RT Prescription
    dose_ref = Dataset()
    dose_ref.DoseReferenceNumber = 1
    dose_ref.DoseReferenceUID = new_uid()
    dose_ref.DoseReferenceStructureType = "VOLUME"
    dose_ref.DoseReferenceDescription = "PTV"
    dose_ref.ReferencedROINumber = ROIS.ptv
    dose_ref.DoseReferenceType = "TARGET"
    dose_ref.TargetPrescriptionDose = spec.prescription_gy
    ds.DoseReferenceSequence = sequence(dose_ref)
    # RT Patient Setup
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    setup.SetupTechnique = "ISOCENTRIC"
    ds.PatientSetupSequence = sequence(setup)
    # RT Fraction Scheme: exactly one fraction group (Appendix A).
    beams = [
        _beam(n, spec, geometry, dynamic=n > spec.beams - spec.dynamic_beams)
        for n in range(1, spec.beams + 1)
    ]
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = spec.fractions
    group.NumberOfBeams = spec.beams
    group.NumberOfBrachyApplicationSetups = 0
    refs = []
    for beam in beams:
        ref = Dataset()
        ref.ReferencedBeamNumber = beam.BeamNumber
        ref.BeamDose = round(spec.dose_per_fraction_gy / spec.beams, 4)
        ref.BeamMeterset = spec.meterset_per_beam
        refs.append(ref)
    group.ReferencedBeamSequence = sequence(*refs)
    ref_dose = Dataset()
    ref_dose.ReferencedDoseReferenceNumber = 1
    ref_dose.TargetPrescriptionDose = spec.dose_per_fraction_gy
    group.ReferencedDoseReferenceSequence = sequence(ref_dose)
    ds.FractionGroupSequence = sequence(group)
    ds.BeamSequence = sequence(*beams)
    # Approval (Appendix A: mandatory)
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = da(ctx.created)
    ds.ReviewTime = tm(ctx.created)
    ds.ReviewerName = "Physicist^Synthetic"
    return ds
