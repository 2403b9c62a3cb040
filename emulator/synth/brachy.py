"""A synthetic HDR brachytherapy patient: a CT with catheters, their structures, an RT Plan
(PS3.3 C.8.8.15, RT Brachy Application Setups) and its dose.

Interstitial catheters run parallel to the patient's long axis through the target; each
is a channel of the afterloader. Each catheter is a bright line in every CT slice, an ROI
interpreted BRACHY_CHANNEL in the structure set, and a STEPWISE channel of the plan whose
dwell positions lie inside the CTV. The plan is made for a given source (by default the
one the simulated afterloader holds today), so a plan for another source is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from devices.afterloader import BrachySource
from emulator.profile import DEFAULT_UID_SET, SopClasses, load_sop_classes
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
from emulator.synth.ct import RESCALE_INTERCEPT, build_ct_series
from emulator.synth.dose import build_dose
from emulator.synth.patient import write_patient_files
from emulator.synth.phantom import PhantomGeometry, ellipse_points

CATHETER_HU = 1500
TIP_MARGIN_MM = 5.0  # the first dwell sits this far back from the catheter's tip
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class BrachySpec:
    """What the HDR plan holds; every field can be set from ``tdw-emu seed --kind
    afterloader``. ``channel_time_s`` is each channel's time for the source at its
    reference strength; dwells share it unevenly, as optimised plans do."""

    channels: int = 3
    dwells_per_channel: int = 6
    step_mm: float = 5.0
    channel_length_mm: float = 1200.0
    transfer_tube_length_mm: float = 1000.0
    channel_time_s: float = 60.0
    fractions: int = 4
    dose_per_fraction_gy: float = 7.0
    machine_name: str = "TDW_HDR1"
    label: str = "TDW_HDR"

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= 40:
            raise ValueError("an HDR plan here has 1 to 40 channels")
        if not 1 <= self.dwells_per_channel <= 48:
            raise ValueError("a channel has 1 to 48 dwells")
        if self.channel_time_s <= 0 or self.step_mm <= 0:
            raise ValueError("channel time and step must be positive")
        if TIP_MARGIN_MM + (self.dwells_per_channel - 1) * self.step_mm > self.channel_length_mm:
            raise ValueError("the dwells do not fit in the channel")

    @property
    def prescription_gy(self) -> float:
        return round(self.fractions * self.dose_per_fraction_gy, 4)


@dataclass(frozen=True)
class Catheter:
    """A catheter in patient coordinates (LPS, mm): straight along z, its tip at ``tip_z``
    and the source going in from the inferior end."""

    number: int
    x: float
    y: float
    tip_z: float

    def point(self, position_mm: float) -> tuple[float, float, float]:
        """Where a dwell ``position_mm`` back from the tip is."""
        return (self.x, self.y, self.tip_z - position_mm)


def catheters(geometry: PhantomGeometry, spec: BrachySpec) -> list[Catheter]:
    """Catheters on a ring at half the target's radius, centred on the target."""
    _, _, centre_z = geometry.isocenter
    spread = (spec.dwells_per_channel - 1) * spec.step_mm
    tip = centre_z + spread / 2 + TIP_MARGIN_MM
    ring = geometry.ptv_radius / 2 if spec.channels > 1 else 0.0
    return [
        Catheter(
            k + 1,
            round(ring * math.cos(2 * math.pi * k / spec.channels), 3),
            round(geometry.ptv_centre_y + ring * math.sin(2 * math.pi * k / spec.channels), 3),
            round(tip, 3),
        )
        for k in range(spec.channels)
    ]


def dwell_positions(spec: BrachySpec) -> list[float]:
    return [round(TIP_MARGIN_MM + k * spec.step_mm, 3) for k in range(spec.dwells_per_channel)]


def dwell_times(spec: BrachySpec, channel: int) -> list[float]:
    """Reference seconds per dwell: more at the ends, as an optimiser gives a line of dwells
    to flatten its dose; they sum to ``channel_time_s``."""
    n = spec.dwells_per_channel
    shape = [
        1.0 + 0.4 * abs(k - (n - 1) / 2) / max(1, (n - 1) / 2) + 0.05 * channel for k in range(n)
    ]
    scale = spec.channel_time_s / sum(shape)
    times = [round(s * scale, 3) for s in shape]
    times[-1] = round(spec.channel_time_s - sum(times[:-1]), 3)
    return times


def _draw_catheters(ct: list[Dataset], geometry: PhantomGeometry, tubes: list[Catheter]) -> None:
    """A catheter is a bright 2×2-pixel spot in every slice it passes through."""
    for index, image in enumerate(ct):
        z = geometry.slice_z(index)
        pixels = np.frombuffer(image.PixelData, dtype="<u2").reshape(image.Rows, image.Columns)
        pixels = pixels.copy()
        for tube in tubes:
            if z > tube.tip_z:
                continue
            column = int((tube.x - geometry.origin_x) / geometry.pixel_spacing)
            row = int((tube.y - geometry.origin_y) / geometry.pixel_spacing)
            pixels[row : row + 2, column : column + 2] = CATHETER_HU - RESCALE_INTERCEPT
        image.PixelData = pixels.tobytes()
        image.BodyPartExamined = "PELVIS"


@dataclass(frozen=True)
class _Roi:
    number: int
    name: str
    interpreted: str
    colour: tuple[int, int, int]
    centre: tuple[float, float]
    radius: float
    top_z: float | None = None  # a catheter stops at its tip


def _rois(geometry: PhantomGeometry, tubes: list[Catheter]) -> list[_Roi]:
    r, cy = geometry.ptv_radius, geometry.ptv_centre_y
    rois = [
        _Roi(1, "EXTERNAL", "EXTERNAL", (255, 255, 0), (0.0, 0.0), 0.0),
        _Roi(2, "CTV", "CTV", (255, 0, 0), (0.0, cy), r),
        _Roi(3, "RECTUM", "ORGAN", (128, 64, 0), (0.0, round(cy + r + 12, 3)), 8.0),
        _Roi(4, "BLADDER", "ORGAN", (255, 255, 128), (0.0, round(cy - r - 14, 3)), 10.0),
    ]
    rois += [
        _Roi(
            10 + t.number,
            f"CATHETER {t.number}",
            "BRACHY_CHANNEL",
            (0, 255, 0),
            (t.x, t.y),
            1.5,
            t.tip_z,
        )
        for t in tubes
    ]
    return rois


def _contour(image: Dataset, points: list[float]) -> Dataset:
    item = Dataset()
    item.ContourImageSequence = sequence(sop_reference(image))
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points) // 3
    item.ContourData = points
    return item


def build_brachy_structure_set(
    ctx: PatientContext,
    geometry: PhantomGeometry,
    ct: list[Dataset],
    tubes: list[Catheter],
    uids: SopClasses,
) -> Dataset:
    """CTV, rectum and bladder, and one BRACHY_CHANNEL ROI per catheter."""
    ds = new_dataset(uids["rt_structure_set"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "RTSTRUCT", new_uid(), 2, "Synthetic brachy structures")
    ctx.apply_frame_of_reference(ds)
    apply_equipment(ds)
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "TDW_HDR_SS"
    ds.StructureSetName = "Synthetic brachy structures"
    ds.StructureSetDate = da(ctx.created)
    ds.StructureSetTime = tm(ctx.created)
    series = Dataset()
    series.SeriesInstanceUID = ct[0].SeriesInstanceUID
    series.ContourImageSequence = sequence(*(sop_reference(image) for image in ct))
    study = Dataset()
    study.ReferencedSOPClassUID = uids["study_component_reference"]
    study.ReferencedSOPInstanceUID = ctx.study_instance_uid
    study.RTReferencedSeriesSequence = sequence(series)
    frame = Dataset()
    frame.FrameOfReferenceUID = ctx.frame_of_reference_uid
    frame.RTReferencedStudySequence = sequence(study)
    ds.ReferencedFrameOfReferenceSequence = sequence(frame)

    rois = _rois(geometry, tubes)
    roi_items, contour_items, observations = [], [], []
    for order, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = roi.number
        item.ReferencedFrameOfReferenceUID = ctx.frame_of_reference_uid
        item.ROIName = roi.name
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(item)
        contours = []
        for index, image in enumerate(ct):
            z = geometry.slice_z(index)
            if roi.interpreted == "EXTERNAL":
                a, b = geometry.body_semi_axes
                contours.append(_contour(image, ellipse_points(a, b, z, 64)))
                continue
            if roi.top_z is not None and z > roi.top_z:
                continue
            radius = roi.radius
            if roi.interpreted == "CTV":
                radius = geometry.ptv_radius_at(z)
            if radius >= 1.0:
                points = ellipse_points(radius, radius, z, 16, centre=roi.centre)
                contours.append(_contour(image, points))
        contour = Dataset()
        contour.ReferencedROINumber = roi.number
        contour.ROIDisplayColor = list(roi.colour)
        contour.ContourSequence = sequence(*contours)
        contour_items.append(contour)
        observation = Dataset()
        observation.ObservationNumber = order
        observation.ReferencedROINumber = roi.number
        observation.RTROIInterpretedType = roi.interpreted
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = sequence(*roi_items)
    ds.ROIContourSequence = sequence(*contour_items)
    ds.RTROIObservationsSequence = sequence(*observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _source_item(source: BrachySource) -> Dataset:
    item = Dataset()
    item.SourceNumber = 1
    item.SourceType = "LINE"
    item.SourceManufacturer = "tdw-emulator"
    item.ActiveSourceDiameter = 0.6
    item.ActiveSourceLength = 3.5
    item.SourceIsotopeName = source.isotope
    item.SourceIsotopeHalfLife = f"{source.half_life_days:g}"
    item.SourceStrengthUnits = "AIR_KERMA_RATE"
    item.ReferenceAirKermaRate = f"{source.reference_air_kerma_rate:g}"
    item.SourceStrengthReferenceDate = da(source.reference)
    item.SourceStrengthReferenceTime = tm(source.reference)
    return item


def _channel(tube: Catheter, spec: BrachySpec) -> Dataset:
    """One STEPWISE channel: a pair of control points per dwell, the cumulative time
    weight in reference seconds, so the Final Cumulative Time Weight is the channel time."""
    times = dwell_times(spec, tube.number)
    total = round(sum(times), 3)
    channel = Dataset()
    channel.ChannelNumber = tube.number
    channel.ChannelLength = spec.channel_length_mm
    channel.ChannelTotalTime = f"{total:g}"
    channel.SourceMovementType = "STEPWISE"
    channel.SourceApplicatorNumber = tube.number
    channel.SourceApplicatorID = f"CATH{tube.number}"
    channel.SourceApplicatorType = "FLEXIBLE"
    channel.SourceApplicatorLength = spec.channel_length_mm - spec.transfer_tube_length_mm
    channel.SourceApplicatorStepSize = spec.step_mm
    channel.TransferTubeNumber = tube.number
    channel.TransferTubeLength = spec.transfer_tube_length_mm
    channel.ReferencedROINumber = 10 + tube.number
    channel.ReferencedSourceNumber = 1
    points, weight = [], 0.0
    for position, seconds in zip(dwell_positions(spec), times, strict=True):
        for after in (weight, round(weight + seconds, 3)):
            point = Dataset()
            point.ControlPointIndex = len(points)
            point.ControlPointRelativePosition = position
            point.ControlPoint3DPosition = list(tube.point(position))
            point.CumulativeTimeWeight = f"{after:g}"
            points.append(point)
        weight = round(weight + seconds, 3)
    channel.NumberOfControlPoints = len(points)
    channel.FinalCumulativeTimeWeight = f"{weight:g}"
    channel.BrachyControlPointSequence = sequence(*points)
    return channel


def build_brachy_plan(
    ctx: PatientContext,
    structure_set: Dataset,
    tubes: list[Catheter],
    spec: BrachySpec,
    source: BrachySource,
    uids: SopClasses,
) -> Dataset:
    """An approved HDR plan: one application setup whose channels are the catheters."""
    ds = new_dataset(uids["rt_plan"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "RTPLAN", new_uid(), 3, "Synthetic HDR plan")
    ctx.apply_frame_of_reference(ds)
    apply_equipment(ds)
    ds.InstanceNumber = 1
    # RT General Plan
    ds.RTPlanLabel = spec.label
    ds.RTPlanName = "Synthetic HDR"
    ds.RTPlanDescription = f"HDR {source.isotope}, {spec.channels} interstitial channels"
    ds.RTPlanDate = da(ctx.created)
    ds.RTPlanTime = tm(ctx.created)
    ds.RTPlanGeometry = "PATIENT"
    ds.ReferencedStructureSetSequence = sequence(sop_reference(structure_set))
    # RT Prescription
    dose_ref = Dataset()
    dose_ref.DoseReferenceNumber = 1
    dose_ref.DoseReferenceUID = new_uid()
    dose_ref.DoseReferenceStructureType = "VOLUME"
    dose_ref.DoseReferenceDescription = "CTV"
    dose_ref.ReferencedROINumber = 2
    dose_ref.DoseReferenceType = "TARGET"
    dose_ref.TargetPrescriptionDose = spec.prescription_gy
    ds.DoseReferenceSequence = sequence(dose_ref)
    # RT Fraction Scheme: one fraction group of one application setup, no beams
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = spec.fractions
    group.NumberOfBeams = 0
    group.NumberOfBrachyApplicationSetups = 1
    setup_ref = Dataset()
    setup_ref.ReferencedBrachyApplicationSetupNumber = 1
    setup_ref.BrachyApplicationSetupDose = spec.dose_per_fraction_gy
    group.ReferencedBrachyApplicationSetupSequence = sequence(setup_ref)
    ref_dose = Dataset()
    ref_dose.ReferencedDoseReferenceNumber = 1
    ref_dose.TargetPrescriptionDose = spec.dose_per_fraction_gy
    group.ReferencedDoseReferenceSequence = sequence(ref_dose)
    ds.FractionGroupSequence = sequence(group)
    # RT Brachy Application Setups
    ds.BrachyTreatmentTechnique = "INTERSTITIAL"
    ds.BrachyTreatmentType = "HDR"
    machine = Dataset()
    machine.TreatmentMachineName = spec.machine_name
    machine.Manufacturer = "tdw-emulator"
    machine.InstitutionName = ""
    machine.ManufacturerModelName = "SimAfterloader HDR"
    machine.DeviceSerialNumber = "SIM-AL-01"
    ds.TreatmentMachineSequence = sequence(machine)
    ds.SourceSequence = sequence(_source_item(source))
    channels = [_channel(tube, spec) for tube in tubes]
    setup = Dataset()
    setup.ApplicationSetupType = "PERINEAL"  # an interstitial template implant
    setup.ApplicationSetupNumber = 1
    setup.ApplicationSetupName = "Interstitial implant"
    total_s = sum(float(c.ChannelTotalTime) for c in channels)
    kerma = source.reference_air_kerma_rate * total_s / SECONDS_PER_HOUR
    setup.TotalReferenceAirKerma = f"{kerma:.6g}"
    setup.ChannelSequence = sequence(*channels)
    ds.ApplicationSetupSequence = sequence(setup)
    # Approval
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = da(ctx.created)
    ds.ReviewTime = tm(ctx.created)
    ds.ReviewerName = "Physicist^Synthetic"
    return ds


@dataclass
class SyntheticBrachyPatient:
    """The objects of one HDR patient, sharing patient, study and frame of reference."""

    context: PatientContext
    ct: list[Dataset]
    structure_set: Dataset
    plan: Dataset
    dose: Dataset
    planning_objects: list[Dataset] = field(init=False)

    def __post_init__(self) -> None:
        self.planning_objects = [*self.ct, self.structure_set, self.plan, self.dose]

    def all_objects(self) -> list[Dataset]:
        return list(self.planning_objects)

    def write(self, out_dir: Path) -> list[Path]:
        """Every object as a DICOM Part 10 file; names come from our own counters."""
        return write_patient_files(
            out_dir,
            self.ct,
            (("RTSTRUCT", self.structure_set), ("RTPLAN", self.plan), ("RTDOSE", self.dose)),
        )


def simulated_afterloader_source() -> BrachySource:
    """The source the simulated afterloader holds today (profiles/machines/afterloader)."""
    from devices.sim.brachy_source import loaded_source
    from devices.sim.linac import load_machine_profile

    return loaded_source(load_machine_profile("afterloader"))


def generate_brachy_patient(
    context: PatientContext | None = None,
    spec: BrachySpec | None = None,
    source: BrachySource | None = None,
    uids: SopClasses | None = None,
    geometry: PhantomGeometry | None = None,
) -> SyntheticBrachyPatient:
    """A consistent HDR patient; every argument has a realistic default (the source: the
    simulated afterloader's, so its plan is treatable there)."""
    context = context or PatientContext(patient_name="TDW^Brachy", patient_id="TDWB0001")
    spec = spec or BrachySpec()
    source = source or simulated_afterloader_source()
    uids = uids or load_sop_classes(DEFAULT_UID_SET)
    geometry = geometry or PhantomGeometry(rows=64, columns=64, pixel_spacing=5.0, slices=16)
    tubes = catheters(geometry, spec)
    ct = build_ct_series(context, geometry, uids)
    _draw_catheters(ct, geometry, tubes)
    structure_set = build_brachy_structure_set(context, geometry, ct, tubes, uids)
    plan = build_brachy_plan(context, structure_set, tubes, spec, source, uids)
    dose = build_dose(context, geometry, plan, uids)
    return SyntheticBrachyPatient(context, ct, structure_set, plan, dose)
