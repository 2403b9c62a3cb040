"""What a device stores: CBCT images (RO-22) and a RIGID registration (RO-23)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from devices.base import CouchCorrection
from devices.clock import Clock
from devices.registry import open_device
from emulator.profile import load_sop_classes
from emulator.results.acquisition import build_cbct_series
from emulator.results.registration import build_registration, rigid_translation
from emulator.results.study_identity import result_identity
from tests.conftest import dciodvfy_errors


def _ups_for(patient, study_uid=None) -> Dataset:
    ups = Dataset()
    ups.StudyInstanceUID = study_uid or patient.context.study_instance_uid
    ups.PatientName = patient.context.patient_name
    ups.PatientID = patient.context.patient_id
    return ups


def test_cbct_and_registration_pass_dciodvfy_and_find_the_setup_error(patient, tmp_path):
    uids = load_sop_classes()
    with open_device("sim", Clock(0)) as device:
        images = device.acquire("CBCT")
        true_error = device.setup_error
    ctx = result_identity(_ups_for(patient), patient.ct)
    cbct = build_cbct_series(ctx, images, uids, "LINAC1")
    translation = rigid_translation(patient.ct, cbct)
    assert translation[:2] == pytest.approx(true_error[:2], abs=0.5)
    registration = build_registration(ctx, patient.ct, cbct, translation, uids, "LINAC1")
    matrix = np.array(
        registration.RegistrationSequence[1]
        .MatrixRegistrationSequence[0]
        .MatrixSequence[0]
        .FrameOfReferenceTransformationMatrix
    ).reshape(4, 4)
    assert matrix[:3, 3] == pytest.approx([-t for t in translation])
    assert registration.FrameOfReferenceUID == patient.ct[0].FrameOfReferenceUID
    assert cbct[0].FrameOfReferenceUID != patient.ct[0].FrameOfReferenceUID
    paths = []
    for index, ds in enumerate([*cbct, registration]):
        paths.append(tmp_path / f"{index:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert {p.name: e for p in paths if (e := dciodvfy_errors(p))} == {}


def test_results_join_the_ups_study_and_copy_its_attributes(patient):
    same = result_identity(_ups_for(patient), [patient.plan])
    assert (same.study_date, same.study_id) == (patient.plan.StudyDate, patient.plan.StudyID)
    other = result_identity(_ups_for(patient, "1.2.826.0.1.3680043.8.498.77"), [patient.plan])
    assert other.study_instance_uid == "1.2.826.0.1.3680043.8.498.77"
    assert other.study_date == "" and other.accession_number == ""  # never invented


def test_couch_correction_removes_the_setup_error(patient):
    with open_device("sim", Clock(0)) as device:
        ctx = result_identity(_ups_for(patient), patient.ct)
        before = build_cbct_series(ctx, device.acquire("CBCT"), load_sop_classes(), "LINAC1")
        shift = rigid_translation(patient.ct, before)
        device.move_couch(CouchCorrection(translation=tuple(-s for s in shift)))
        after = build_cbct_series(ctx, device.acquire("CBCT"), load_sop_classes(), "LINAC1")
    residual = rigid_translation(patient.ct, after)
    assert max(abs(r) for r in residual) < 0.5 < max(abs(s) for s in shift)
