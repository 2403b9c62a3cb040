"""Malformed input gets a clear refusal; afterwards the Archive answers and has lost nothing."""

from __future__ import annotations

import socket
import struct
import threading
from copy import deepcopy

import numpy as np
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from emulator.store import AdmissionError, AdmissionLimits, admit
from tests.conftest import wait_until

CALLER = "PLANNER"
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # PS3.8 9.3.8: service-user, no reason


@pytest.fixture
def lenient_writing():
    """Lets a test build invalid objects on purpose (the suite otherwise raises on them)."""
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.WARN
    yield
    pydicom_config.settings.writing_validation_mode = previous


@pytest.fixture
def archive(tmp_path, patient_files):
    config = ArchiveConfig(
        data_dir=tmp_path,
        ae_title="ARCHIVE",
        port=0,
        allowed_callers=[CALLER],
        limits=AdmissionLimits(max_dataset_bytes=4_000_000),
    )
    with ArchiveServer(config) as server:
        peer = Peer("ARCHIVE", *server.address)
        scu.store(CALLER, peer, patient_files)
        yield server, peer


def assert_intact(server: ArchiveServer, peer: Peer, patient_files) -> None:
    """The Archive still answers C-ECHO and every acknowledged object is readable."""
    assert scu.echo(CALLER, peer) == 0x0000
    assert server.store.count() == len(patient_files)
    for instance in server.store:
        assert server.store.read(instance).SOPInstanceUID == instance.sop_instance_uid


def store_status(peer: Peer, ds: Dataset) -> Dataset:
    ae = AE(ae_title=CALLER)
    ae.requested_contexts = [build_context(ds.SOPClassUID)]
    assoc = ae.associate(peer.host, peer.port, ae_title="ARCHIVE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_bad_study_uid_is_refused(archive, patient, patient_files, lenient_writing):
    server, peer = archive
    ds = deepcopy(patient.plan)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.abc.04"
    status = store_status(peer, ds)
    assert status.Status == 0xA900
    assert "StudyInstanceUID" in status.ErrorComment
    assert_intact(server, peer, patient_files)


def test_missing_series_uid_is_refused(archive, patient, patient_files):
    server, peer = archive
    ds = deepcopy(patient.plan)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.SeriesInstanceUID
    status = store_status(peer, ds)
    assert (status.Status, status.ErrorComment) == (0xA900, "missing SeriesInstanceUID")
    assert_intact(server, peer, patient_files)


def test_oversized_identifying_element_is_refused(archive, patient, patient_files, lenient_writing):
    server, peer = archive
    ds = deepcopy(patient.plan)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "X" * 10_000
    status = store_status(peer, ds)
    assert status.Status == 0xA900 and "PatientID" in status.ErrorComment
    assert_intact(server, peer, patient_files)


def test_dataset_over_the_size_limit_is_refused(archive, patient, patient_files):
    server, peer = archive
    ds = deepcopy(patient.ct[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 1500
    ds.PixelData = np.zeros((1500, 1500), "<u2").tobytes()  # 4.5 MB > 4 MB limit
    status = store_status(peer, ds)
    assert status.Status == 0xA700
    assert_intact(server, peer, patient_files)


def test_admission_refuses_garbage_and_mismatched_classes(patient_files, patient):
    with pytest.raises(AdmissionError) as garbage:
        admit(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    # pydicom reads what it can of garbage; either way it is refused with a reason.
    assert garbage.value.status in (0xA900, 0xC000) and garbage.value.comment
    plan_bytes = next(p for p in patient_files if p.name == "RTPLAN.dcm").read_bytes()
    with pytest.raises(AdmissionError) as mismatch:
        admit(plan_bytes, expected_sop_class=patient.ct[0].SOPClassUID)
    assert mismatch.value.status == 0xA900
    with pytest.raises(AdmissionError) as wrong_instance:
        admit(plan_bytes, expected_sop_instance="1.2.3")
    assert wrong_instance.value.status == 0xA900


# The client's own DUL thread fails after the drop; that is the point, not a defect.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("how", ["a-abort", "tcp-reset"])
def test_association_dropped_mid_transfer(archive, patient, patient_files, how):
    server, peer = archive
    big = deepcopy(patient.ct[0])
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    big.Rows = big.Columns = 1400
    big.PixelData = np.ones((1400, 1400), "<u2").tobytes()  # 3.9 MB, within the limit
    ae = AE(ae_title=CALLER)
    ae.maximum_pdu_size = 4096  # many small PDUs, so the drop lands mid-dataset
    ae.dimse_timeout = ae.network_timeout = 5
    ae.requested_contexts = [build_context(big.SOPClassUID)]
    assoc = ae.associate(peer.host, peer.port, ae_title="ARCHIVE")
    assert assoc.is_established
    transport = assoc.dul.socket
    original_send = transport.send
    sent = {"bytes": 0}

    def send_then_drop(data: bytes) -> None:
        """Sends the first megabyte of P-DATA, then drops the connection as ``how`` says."""
        if sent["bytes"] > 1_000_000:
            raw = transport.socket
            if how == "a-abort":
                raw.sendall(A_ABORT)
            else:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            raise OSError("connection dropped by the test")
        sent["bytes"] += len(data)
        original_send(data)

    transport.send = send_then_drop
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(status=assoc.send_c_store(big)))
    sender.start()
    sender.join(timeout=30)
    assert 1_000_000 < sent["bytes"] < len(big.PixelData)
    status = result.get("status")
    assert not status or "Status" not in status  # never acknowledged
    # The Archive has finished with the dropped association: nothing more can be written.
    wait_until(lambda: server.open_associations == 0, 10, "the Archive ending the association")
    assert server.store.get(big.SOPInstanceUID) is None
    assert_intact(server, peer, patient_files)


def test_non_dicom_bytes_on_the_port(archive, patient_files):
    server, peer = archive
    with socket.create_connection((peer.host, peer.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: archive\r\n\r\n" + bytes(range(256)) * 64)
        raw.settimeout(10)
        try:
            reply = raw.recv(64)
        except ConnectionResetError:
            reply = b""  # closed: as good as an A-ABORT
        except TimeoutError:
            pytest.fail("the Archive neither answered nor closed within 10 s")
    # The Archive answers garbage with an A-ABORT (PDU type 0x07) or just closes.
    assert reply == b"" or reply[0] == 0x07, reply
    assert_intact(server, peer, patient_files)


@pytest.mark.parametrize(
    ("patient_id", "refusal"),
    [
        (["TDW1", "TDW2", "x"], "PatientID holds 3 values; its VM is 1"),
        ("TDW\x001", "control character in PatientID"),
    ],
    ids=["multi-valued", "nul"],
)
def test_values_the_index_cannot_hold_are_refused_with_a_reason(patient, patient_id, refusal):
    """docs/archive.md: refused with A900 and a comment, never indexed as something else."""
    import io

    from emulator.store.admission import AdmissionError, admit

    ds = deepcopy(patient.ct[0])  # the fixture is shared by the session: never change it
    ds.PatientID = patient_id
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(AdmissionError) as refused:
        admit(buffer.getvalue())
    assert refused.value.status == 0xA900
    assert refusal in str(refused.value)
