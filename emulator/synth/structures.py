"""RT Structure Set on the phantom CT: EXTERNAL, PTV and an ISOCENTER point.

Appendix A asks that closed planar contours sit exactly on a CT slice and reference it,
that every image of the volume is listed, and that every ROI has an observation.
"""

from __future__ import annotations

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
from emulator.synth.phantom import PhantomGeometry, ellipse_points


@dataclass(frozen=True)
class RoiNumbers:
    external: int = 1
    ptv: int = 2
    isocenter: int = 3


ROIS = RoiNumbers()


def _contour(image: Dataset, geometric_type: str, points: list[float]) -> Dataset:
    item = Dataset()
    item.ContourImageSequence = sequence(sop_reference(image))
    item.ContourGeometricType = geometric_type
    item.NumberOfContourPoints = len(points) // 3
    item.ContourData = points
    return item


def build_structure_set(
    ctx: PatientContext, geometry: PhantomGeometry, ct: list[Dataset], uids: SopClasses
) -> Dataset:
    ds = new_dataset(uids["rt_structure_set"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "RTSTRUCT", new_uid(), 2, "Synthetic structures")
    ctx.apply_frame_of_reference(ds)
    apply_equipment(ds)
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "TDW_RTSS"
    ds.StructureSetName = "Synthetic structures"
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

    rois = [
        (ROIS.external, "EXTERNAL", "EXTERNAL", [255, 255, 0]),
        (ROIS.ptv, "PTV", "PTV", [255, 0, 0]),
        (ROIS.isocenter, "ISOCENTER", "ISOCENTER", [0, 255, 255]),
    ]
    roi_items = []
    for number, name, _, _ in rois:
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = ctx.frame_of_reference_uid
        item.ROIName = name
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(item)
    ds.StructureSetROISequence = sequence(*roi_items)

    a, b = geometry.body_semi_axes
    external = [
        _contour(image, "CLOSED_PLANAR", ellipse_points(a, b, geometry.slice_z(i), 64))
        for i, image in enumerate(ct)
    ]
    ptv = []
    for i, image in enumerate(ct):
        z = geometry.slice_z(i)
        r = geometry.ptv_radius_at(z)
        if r >= 1.0:
            ptv.append(
                _contour(
                    image,
                    "CLOSED_PLANAR",
                    ellipse_points(r, r, z, 32, centre=(0.0, geometry.ptv_centre_y)),
                )
            )
    iso_slice = geometry.slices // 2
    isocenter = [_contour(ct[iso_slice], "POINT", list(geometry.isocenter))]

    contour_items = []
    for (number, _, _, colour), contours in zip(rois, (external, ptv, isocenter), strict=True):
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = colour
        item.ContourSequence = sequence(*contours)
        contour_items.append(item)
    ds.ROIContourSequence = sequence(*contour_items)

    observations = []
    for index, (number, _, interpreted, _) in enumerate(rois, start=1):
        item = Dataset()
        item.ObservationNumber = index
        item.ReferencedROINumber = number
        item.RTROIInterpretedType = interpreted
        item.ROIInterpreter = ""
        observations.append(item)
    ds.RTROIObservationsSequence = sequence(*observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds
