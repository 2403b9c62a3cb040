"""C-MOVE sub-operations send the Archive's stored bytes, or convert when they must.

The destination is DCMTK's storescp: once accepting what it is offered (the stored
transfer syntax, so the file goes out as it is), once accepting Implicit VR Little Endian
only (so the file must be read and converted, as pynetdicom did for every object before).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dsutils import split_dataset

from emulator.net import scu, stored_file_sender
from emulator.net.peers import Peer
from emulator.net.ports import free_port, wait_for_port
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from emulator.store.importer import import_files
from tests.conftest import DCMTK_ENV, dcmtk


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Files the sender had to read and convert instead of sending as stored."""
    read = []
    real = stored_file_sender.dcmread

    def counting(path, *args, **kwargs):
        read.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(stored_file_sender, "dcmread", counting)
    return read


def _storescp(out: Path, *options: str):
    port = free_port()
    process = subprocess.Popen(
        [dcmtk("storescp"), *options, "--aetitle", "STORESCP", "--output-directory", str(out),
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV,
    )  # fmt: skip
    wait_for_port(port)
    return process, port


def _move_series(tmp_path, patient, patient_files, *storescp_options: str):
    received = tmp_path / "received"
    received.mkdir()
    process, port = _storescp(received, *storescp_options)
    archive = ArchiveServer(
        ArchiveConfig(
            data_dir=tmp_path / "archive",
            port=0,
            peers=[Peer("STORESCP", "127.0.0.1", port)],
            allowed_callers=["MOVER"],
        )
    )
    import_files(archive.store, patient_files)
    try:
        with archive:
            ident = Dataset()
            ident.QueryRetrieveLevel = "SERIES"
            ident.StudyInstanceUID = patient.context.study_instance_uid
            ident.SeriesInstanceUID = patient.ct[0].SeriesInstanceUID
            result = scu.move("MOVER", Peer("ARCHIVE", *archive.address), ident, "STORESCP")
            stored = {
                i.sop_instance_uid: archive.store.path_for(i.sha256)
                for i in archive.store.select("series_instance_uid = ?", (ident.SeriesInstanceUID,))
            }
    finally:
        process.terminate()
        process.wait(timeout=10)
    return result, stored, {dcmread(p).SOPInstanceUID: p for p in received.iterdir()}


def test_stored_files_go_out_byte_for_byte(tmp_path, patient, patient_files, conversions):
    result, stored, received = _move_series(tmp_path, patient, patient_files)
    assert result.status == 0x0000
    assert result.completed == len(patient.ct) and result.failed == 0
    assert set(received) == set(stored) and len(stored) == len(patient.ct)
    for uid, path in stored.items():
        assert _dataset_bytes(received[uid]) == _dataset_bytes(path)
    assert conversions == []


def test_a_destination_without_the_stored_syntax_gets_converted_objects(
    tmp_path, patient, patient_files, conversions
):
    # +xi: storescp accepts Implicit VR Little Endian only; the Archive stores explicit VR.
    result, stored, received = _move_series(tmp_path, patient, patient_files, "+xi")
    assert result.status == 0x0000 and result.completed == len(patient.ct)
    assert set(received) == set(stored)
    for uid, path in stored.items():
        got = dcmread(received[uid])
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert dcmread(path).file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
        assert got == dcmread(path)
    assert sorted(conversions) == sorted(stored.values())
