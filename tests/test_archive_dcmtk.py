"""DCMTK's tools as independent peers of a real ``tdw-emu archive`` process.

DCMTK is called by absolute path: pynetdicom's same-named scripts sit earlier on PATH
inside the venv. TCP_NODELAY=1 is set for DCMTK as for our own sockets (spec-notes).
"""

from __future__ import annotations

import subprocess
from copy import deepcopy
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import DCMTK_ENV, dcmtk

ENV = DCMTK_ENV


def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture
def archive(tmp_path, patient_files, storescp, archive_process_factory):
    port, _ = storescp
    return archive_process_factory(
        "--data-dir",
        str(tmp_path / "archive"),
        "--ae-title",
        "ARCHIVE",
        "--port",
        "0",
        "--peer",
        f"STORESCP@127.0.0.1:{port}",
        "--allow",
        "MOVESCU",
        "--allow",
        "FINDSCU",
        "--allow",
        "ECHOSCU",
        "--allow",
        "STORESCU",
        "--import",
        str(patient_files[0].parent),
    )


def test_dcmtk_is_what_we_call():
    result = run(dcmtk("storescp"), "--version")
    assert "dcmtk" in result.stdout.lower() or "OFFIS" in result.stdout


def test_echoscu(archive):
    result = run(
        dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "ARCHIVE", archive.host, str(archive.port)
    )
    assert result.returncode == 0, result.stderr


def test_echoscu_from_unknown_ae_is_rejected(archive):
    result = run(
        dcmtk("echoscu"), "-aet", "NOBODY", "-aec", "ARCHIVE", archive.host, str(archive.port)
    )
    assert result.returncode != 0
    assert "reject" in (result.stdout + result.stderr).lower()


def test_findscu_study_and_series(archive, patient, tmp_path):
    out = tmp_path / "find"
    out.mkdir()
    result = run(
        dcmtk("findscu"),
        "-S",
        "-aet",
        "FINDSCU",
        "-aec",
        "ARCHIVE",
        "-X",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={patient.context.study_instance_uid}",
        "-k",
        "SeriesInstanceUID",
        "-k",
        "Modality",
        "-k",
        "NumberOfSeriesRelatedInstances",
        archive.host,
        str(archive.port),
    )
    assert result.returncode == 0, result.stderr
    responses = [dcmread(p) for p in sorted(out.iterdir())]
    assert {r.Modality for r in responses} == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE", "PLAN"}
    ct = next(r for r in responses if r.Modality == "CT")
    assert int(ct.NumberOfSeriesRelatedInstances) == len(patient.ct)


def test_storescu_stores_into_the_archive(archive, tmp_path, patient):
    copy = deepcopy(patient.plan)  # Dataset.copy() is shallow and would alter the fixture
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    path = tmp_path / "plan-copy.dcm"
    copy.save_as(path, enforce_file_format=True)
    result = run(
        dcmtk("storescu"),
        "-aet",
        "STORESCU",
        "-aec",
        "ARCHIVE",
        archive.host,
        str(archive.port),
        str(path),
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "find"
    out.mkdir()
    found = run(
        dcmtk("findscu"),
        "-S",
        "-aet",
        "FINDSCU",
        "-aec",
        "ARCHIVE",
        "-X",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        "SOPInstanceUID=1.2.826.0.1.3680043.8.498.1",
        "-k",
        "SOPClassUID",
        archive.host,
        str(archive.port),
    )
    assert found.returncode == 0
    assert [dcmread(p).SOPClassUID for p in out.iterdir()] == [patient.plan.SOPClassUID]


def test_movescu_retrieves_plan_and_ct_series_into_storescp(archive, storescp, patient):
    _, received_dir = storescp
    plan = run(
        dcmtk("movescu"),
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        "ARCHIVE",
        "-aem",
        "STORESCP",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={patient.context.study_instance_uid}",
        "-k",
        f"SOPInstanceUID={patient.plan.SOPInstanceUID}",
        archive.host,
        str(archive.port),
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    series = run(
        dcmtk("movescu"),
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        "ARCHIVE",
        "-aem",
        "STORESCP",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={patient.context.study_instance_uid}",
        "-k",
        f"SeriesInstanceUID={patient.ct[0].SeriesInstanceUID}",
        archive.host,
        str(archive.port),
    )
    assert series.returncode == 0, series.stdout + series.stderr
    received = {dcmread(p).SOPInstanceUID: dcmread(p) for p in Path(received_dir).iterdir()}
    expected = [patient.plan, *patient.ct]
    assert set(received) == {ds.SOPInstanceUID for ds in expected}
    for ds in expected:
        assert received[ds.SOPInstanceUID] == ds


def test_movescu_to_unknown_destination_fails(archive, patient):
    result = run(
        dcmtk("movescu"),
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        "ARCHIVE",
        "-aem",
        "ELSEWHERE",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"SOPInstanceUID={patient.plan.SOPInstanceUID}",
        archive.host,
        str(archive.port),
    )
    # movescu names the status DCMTK decoded: A801, Refused: Move Destination unknown
    # (PS3.4 C.4.2.1.5), and exits with its "C-MOVE failed" code (EXITCODE_CMOVE_ERROR, 69).
    assert "refused: movedestinationunknown" in result.stderr.lower(), result.stderr
    assert result.returncode == 69, result.returncode
