"""Acceptance: `tdw-emu run` passes a strict TMS written from the seed, RO-17 to RO-26."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from emulator.store import ObjectStore
from tests.conftest import REPO, free_port
from tests.strict_tms import StrictTms
from tests.ups_client import code

PUSH = "1.2.840.10008.5.1.4.34.6.1"


def _inputs(objects: list[Dataset], ae_title: str) -> Dataset:
    """Seed Table 3.21-1 shape: Retrieve AE Title inside the Referenced Series Sequence."""
    series = Dataset()
    series.SeriesInstanceUID = objects[0].SeriesInstanceUID
    series.RetrieveAETitle = ae_title
    refs = []
    for ds in objects:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(ref)
    series.ReferencedSOPSequence = Sequence(refs)
    item = Dataset()
    item.StudyInstanceUID = objects[0].StudyInstanceUID
    item.ReferencedSeriesSequence = Sequence([series])
    return item


def _ups(patient, workitem: tuple[str, str], inputs: list[Dataset]) -> Dataset:
    ups = Dataset()
    ups.SOPClassUID = PUSH
    ups.SOPInstanceUID = str(generate_uid())
    ups.ProcedureStepState = "SCHEDULED"
    ups.ProcedureStepLabel = workitem[1][:64]
    ups.ScheduledStationNameCodeSequence = Sequence([code("LINAC1", "99STRICT", "Strict linac")])
    ups.ScheduledProcedureStepStartDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    ups.ScheduledWorkitemCodeSequence = Sequence([code(workitem[0], "DCM", workitem[1])])
    parameter = Dataset()
    parameter.ValueType = "TEXT"
    parameter.ConceptNameCodeSequence = Sequence(
        [code("2008001", "99IHERO2008", "Treatment Delivery Type")]
    )
    parameter.TextValue = "TREATMENT"
    ups.ScheduledProcessingParametersSequence = Sequence([parameter])
    ups.InputInformationSequence = Sequence(inputs)
    ups.StudyInstanceUID = patient.context.study_instance_uid
    ups.PatientName = patient.context.patient_name
    ups.PatientID = patient.context.patient_id
    return ups


@pytest.mark.parametrize("interrupt", [None, "2:5"], ids=["normal", "interrupted"])
def test_run_passes_an_independent_strict_tms(
    tmp_path, patient, patient_files, archive_process_factory, interrupt
):
    device_port = free_port()
    archive = archive_process_factory(
        "--data-dir",
        str(tmp_path / "archive"),
        "--port",
        "0",
        "--ae-title",
        "ARCHIVE",
        "--peer",
        f"PDS1@127.0.0.1:{device_port}",
        "--import",
        str(patient_files[0].parent),
    )
    worklist = [
        _ups(
            patient,
            ("121707", "RT Patient Position Acquisition, CT kV"),
            [_inputs(patient.ct, "ARCHIVE")],
        ),
        _ups(patient, ("121714", "RT Patient Position Registration, 3D CT general"), []),
        _ups(patient, ("121722", "RT Patient Position Adjustment"), []),
        _ups(
            patient,
            ("121726", "RT Treatment with Internal Verification"),
            [_inputs([patient.plan], "ARCHIVE"), _inputs([patient.delivery_instruction], "STRICT")],
        ),
    ]
    tms = StrictTms(
        worklist,
        {patient.delivery_instruction.SOPInstanceUID: patient.delivery_instruction},
        {"PDS1": ("127.0.0.1", device_port)},
    )
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "emulator.cli",
                "run",
                "--kind",
                "pds",
                "--station",
                "LINAC1",
                "--tms",
                f"STRICT@{tms.address[0]}:{tms.address[1]}",
                "--archive",
                f"ARCHIVE@{archive.host}:{archive.port}",
                "--ae-title",
                "PDS1",
                "--listen-port",
                str(device_port),
                "--profile",
                "ihe-ro-2008",
                "--uids",
                "final",
                "--time-scale",
                "0",
                "--data-dir",
                str(tmp_path / "device"),
                *(["--interrupt", interrupt] if interrupt else []),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
    finally:
        tms.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert tms.violations == []
    delivered = "CANCELED" if interrupt else "COMPLETED"
    assert [u.ProcedureStepState for u in tms.ups.values()] == ["COMPLETED"] * 3 + [delivered]
    delivery = list(tms.ups.values())[3]
    assert str(delivery.SOPInstanceUID) in tms.beam_reported
    archive.stop()
    store = ObjectStore(tmp_path / "archive")
    try:
        produced = store.select("modality IN ('REG', 'RTRECORD') OR series_number = '30'")
        assert {i.values["study_instance_uid"] for i in produced} == {
            patient.context.study_instance_uid
        }
        assert {i.values["modality"] for i in produced} == {"CT", "REG", "RTRECORD"}
    finally:
        store.close()
