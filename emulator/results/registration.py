"""Position registration results (RO-23): a RIGID Spatial Registration.

It stores the transform :mod:`emulator.results.rigid_registration` measured, in all six
degrees of freedom, never an assumed one.
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


def _flat(matrix: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in matrix.flatten()]


def build_registration(
    ctx: PatientContext,
    planning_ct: list[Dataset],
    cbct: list[Dataset],
    cbct_to_planning: np.ndarray,
    uids: SopClasses,
    station: str,
    moment: dt.datetime | None = None,
) -> Dataset:
    """Registers the CBCT frame to the planning frame (the Registered Frame of Reference).

    ``cbct_to_planning`` is the measured 4x4 rigid transform; PS3.3 C.20.2.1.1 has the
    matrix map the Referenced frame (the CBCT's) into the Registered one (the plan's).
    """
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
    ds.RegistrationSequence = sequence(
        item(planning_ct[0].FrameOfReferenceUID, planning_ct, _flat(np.eye(4)), "identity"),
        item(cbct[0].FrameOfReferenceUID, cbct, _flat(cbct_to_planning), "image_content"),
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
