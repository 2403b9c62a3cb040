"""Position registration results (RO-23): a RIGID Spatial Registration.

The translation is measured, not assumed: it is the difference of the body centroids of
the planning CT and the CBCT (both isocentric, same axes), which is what a rigid
registration of a phantom converges to in x and y. The phantom is uniform along z, so z is
not observable and is left at 0.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom.dataset import Dataset

from emulator.profile import SopClasses, load_yaml
from emulator.synth import PatientContext
from emulator.synth.common import (
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

BODY_THRESHOLD_HU = -300.0


def body_centroid(images: list[Dataset]) -> np.ndarray:
    """Mean (x, y) position of voxels above the body threshold, in patient coordinates."""
    total, weight = np.zeros(2), 0
    for ds in images:
        hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0)
        )
        rows, cols = np.nonzero(hu > BODY_THRESHOLD_HU)
        if rows.size == 0:
            continue
        x0, y0 = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        total += [x0 + cols.mean() * dx, y0 + rows.mean() * dy]
        weight += 1
    if weight == 0:
        raise ValueError("no body voxels found: cannot register")
    return total / weight


def rigid_translation(
    planning_ct: list[Dataset], cbct: list[Dataset]
) -> tuple[float, float, float]:
    """Where the patient lies relative to the plan (mm); the couch moves by its negative."""
    shift = body_centroid(cbct) - body_centroid(planning_ct)
    return (round(float(shift[0]), 2), round(float(shift[1]), 2), 0.0)


def _matrix(translation: tuple[float, float, float]) -> list[float]:
    m = np.eye(4)
    m[:3, 3] = translation
    return [round(float(v), 4) for v in m.flatten()]


def build_registration(
    ctx: PatientContext,
    planning_ct: list[Dataset],
    cbct: list[Dataset],
    translation: tuple[float, float, float],
    uids: SopClasses,
    station: str,
    moment: dt.datetime | None = None,
) -> Dataset:
    """Registers the CBCT frame to the planning frame (the Registered Frame of Reference)."""
    moment = moment or dt.datetime.now().replace(microsecond=0)
    ds = new_dataset(uids["spatial_registration"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "REG", new_uid(), 31, "Couch correction registration")
    ds.BodyPartExamined = "CHEST"  # unpaired, so Series Laterality stays absent
    ds.SeriesDate, ds.SeriesTime = da(moment), tm(moment)
    ds.FrameOfReferenceUID = planning_ct[0].FrameOfReferenceUID
    ds.PositionReferenceIndicator = planning_ct[0].get("PositionReferenceIndicator", "")
    apply_equipment(ds, model="tdw-emulator registration", station=station[:16])
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = da(moment), tm(moment)
    ds.ContentLabel = "COUCH_CORRECTION"
    ds.ContentDescription = "Rigid CBCT to planning CT registration"
    ds.ContentCreatorName = ""

    def item(frame_uid: str, images: list[Dataset], matrix: list[float], kind: str) -> Dataset:
        entry = Dataset()
        entry.FrameOfReferenceUID = frame_uid
        entry.ReferencedImageSequence = sequence(*(sop_reference(image) for image in images))
        transform = Dataset()
        transform.FrameOfReferenceTransformationMatrix = matrix
        transform.FrameOfReferenceTransformationMatrixType = "RIGID"
        registration = Dataset()
        code = load_yaml("codes.yaml")["registration_types"][kind]
        registration.RegistrationTypeCodeSequence = sequence(
            code_item(code["code_value"], code["coding_scheme_designator"], code["code_meaning"])
        )
        registration.MatrixSequence = sequence(transform)
        entry.MatrixRegistrationSequence = sequence(registration)
        return entry

    # Item 1: the Registered Frame of Reference itself (identity); item 2: CBCT -> planning.
    inverse = tuple(-t for t in translation)
    ds.RegistrationSequence = sequence(
        item(planning_ct[0].FrameOfReferenceUID, planning_ct, _matrix((0.0, 0.0, 0.0)), "identity"),
        item(cbct[0].FrameOfReferenceUID, cbct, _matrix(inverse), "image_content"),
    )
    # Common Instance Reference: the images, by study and series.
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    for image in [*planning_ct, *cbct]:
        by_study.setdefault(str(image.StudyInstanceUID), {}).setdefault(
            str(image.SeriesInstanceUID), []
        ).append(image)
    series_items = []
    other_studies = []
    for study_uid, series in by_study.items():
        entries = []
        for series_uid, images in series.items():
            entry = Dataset()
            entry.SeriesInstanceUID = series_uid
            entry.ReferencedInstanceSequence = sequence(*(sop_reference(i) for i in images))
            entries.append(entry)
        if study_uid == str(ds.StudyInstanceUID):
            series_items.extend(entries)
        else:
            study = Dataset()
            study.StudyInstanceUID = study_uid
            study.ReferencedSeriesSequence = sequence(*entries)
            other_studies.append(study)
    if series_items:
        ds.ReferencedSeriesSequence = sequence(*series_items)
    if other_studies:
        ds.StudiesContainingOtherReferencedInstancesSequence = sequence(*other_studies)
    return ds
