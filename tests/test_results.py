"""What a device stores: CBCT images (RO-22) and a RIGID registration (RO-23)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from emulator.results.study_identity import result_identity


def _ups_for(patient, study_uid=None) -> Dataset:
    ups = Dataset()
    ups.StudyInstanceUID = study_uid or patient.context.study_instance_uid
    ups.PatientName = patient.context.patient_name
    ups.PatientID = patient.context.patient_id
    return ups


def test_results_join_the_ups_study_and_copy_its_attributes(patient):
    same = result_identity(_ups_for(patient), [patient.plan])
    assert (same.study_date, same.study_id) == (patient.plan.StudyDate, patient.plan.StudyID)
    other = result_identity(_ups_for(patient, "1.2.826.0.1.3680043.8.498.77"), [patient.plan])
    assert other.study_instance_uid == "1.2.826.0.1.3680043.8.498.77"
    assert other.study_date == "" and other.accession_number == ""  # never invented
