"""`tdw-emu tms --seed` as a real process, retrieved from by DCMTK; malformed requests."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from emulator.conformance.iod_table import check_iod
from emulator.profile import load_sop_classes
from emulator.ups_references import references_in
from tests.conftest import (
    DCMTK_ENV,
    dciodvfy_errors,
    dcmtk,
    printed_metrics_url,
    scrape,
    wait_until,
)
from tests.ups_client import UpsClient, cancellation, progress

ENV = DCMTK_ENV


@pytest.fixture
def tms(tmp_path, storescp, archive_process_factory):
    port, _ = storescp
    return archive_process_factory(
        "--data-dir",
        str(tmp_path / "site"),
        "--port",
        "0",
        "--archive-port",
        "0",
        "--peer",
        f"STORESCP@127.0.0.1:{port}",
        "--allow",
        "DEVICE",
        "--allow",
        "MOVESCU",
        "--seed",
        "LINAC1",
        "--metrics-port",
        "0",
        command="tms",
        ready="ready",
    )


def _tms_associations(tms, how: str) -> float:
    samples = scrape(printed_metrics_url(tms.output))
    key = (
        "tdw_associations_total",
        frozenset({"ae": "TMS", "role": "acceptor", "event": how}.items()),
    )
    return samples.get(key, 0.0)


def test_every_input_retrieved_by_dcmtk_from_the_ae_it_names(tms, storescp):
    _, received_dir = storescp
    host, port = tms.addresses["TMS"]
    with UpsClient(host, port, "TMS", "DEVICE") as client:
        worklist = client.worklist("LINAC1")
    assert len(worklist) == 4
    refs = [r for ups in worklist for r in references_in(ups.InputInformationSequence)]
    assert {r.retrieve_ae_title for r in refs} == {"ARCHIVE", "TMS"}
    for ref in refs:
        ae_host, ae_port = tms.addresses[ref.retrieve_ae_title]
        result = subprocess.run(
            [
                dcmtk("movescu"),
                "-S",
                "-aet",
                "MOVESCU",
                "-aec",
                ref.retrieve_ae_title,
                "-aem",
                "STORESCP",
                "-k",
                "QueryRetrieveLevel=IMAGE",
                "-k",
                f"StudyInstanceUID={ref.study_instance_uid}",
                "-k",
                f"SOPInstanceUID={ref.sop_instance_uid}",
                ae_host,
                str(ae_port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    received = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in Path(received_dir).iterdir()
    }
    assert set(received) == {r.sop_instance_uid for r in refs}
    instruction_class = load_sop_classes()["rt_beams_delivery_instruction"]
    for ref in refs:
        path = received[ref.sop_instance_uid]
        if ref.sop_class_uid == instruction_class:  # dicom3tools does not know this IOD
            assert check_iod(dcmread(path), "rt_beams_delivery_instruction") == []
        else:
            assert dciodvfy_errors(path) == [], path


def _ups_find(client: UpsClient, **keys) -> int:
    ident = Dataset()
    ident.ProcedureStepState = "SCHEDULED"
    ident.SOPInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ident, keyword, value)
    return client.find_status(ident)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_requests_get_clean_failures(tms):
    from pydicom import config as pydicom_config

    host, port = tms.addresses["TMS"]
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.WARN
    try:
        with UpsClient(host, port, "TMS", "DEVICE") as client:
            assert _ups_find(client, SOPInstanceUID="1.2.abc!!") == 0xC000  # garbage UI
            worklist = client.worklist("LINAC1")
            uid = worklist[0].SOPInstanceUID
            transaction = str(generate_uid())
            assert client.change_state(uid, "IN PROGRESS", transaction)[0] == 0
            huge = progress(transaction, 10)
            huge.ProcedureStepProgressInformationSequence[0].ProcedureStepProgressDescription = (
                "x" * 70_000
            )
            assert client.n_set(uid, huge) == 0x0106  # 70 KB in an ST (1024 chars at most)
            assert len(client.worklist("LINAC1")) == 3  # still answering
    finally:
        pydicom_config.settings.writing_validation_mode = previous
    assert tms.process.poll() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_association_aborted_mid_n_set(tms):
    host, port = tms.addresses["TMS"]
    with UpsClient(host, port, "TMS", "DEVICE") as client:
        uid = client.worklist("LINAC1")[0].SOPInstanceUID
        transaction = str(generate_uid())
        assert client.change_state(uid, "IN PROGRESS", transaction)[0] == 0
    doomed = UpsClient(host, port, "TMS", "DEVICE")
    transport = doomed.assoc.dul.socket
    original_send = transport.send
    sent = {"pdus": 0}

    def send_then_reset(data: bytes) -> None:
        # The N-SET command goes out, then the connection is reset before the data set.
        if sent["pdus"] >= 1:
            raw = transport.socket
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            raise OSError("connection dropped by the test")
        sent["pdus"] += 1
        original_send(data)

    transport.send = send_then_reset
    doomed.assoc.dimse_timeout = 5
    update = progress(transaction, 60)
    update.ProcedureStepProgressInformationSequence[0].ProcedureStepProgressDescription = "x" * 900
    with contextlib.suppress(AttributeError, OSError):
        doomed.n_set(uid, update)  # the SCU sees no response: that is the point
    # The TMS has finished with the dropped association (nothing more can arrive on it).
    wait_until(lambda: _tms_associations(tms, "aborted") >= 1, 10, "the TMS seeing the reset")
    with UpsClient(host, port, "TMS", "DEVICE") as client:
        status, ups = client.n_get(uid)
        assert status == 0 and ups.ProcedureStepState == "IN PROGRESS"
        assert "ProcedureStepProgressInformationSequence" not in ups  # half an N-SET is nothing
        assert client.n_set(uid, progress(transaction, 61)) == 0  # the retry succeeds
    assert tms.process.poll() is None


def test_independent_scu_full_cycle_against_the_tms_process(tms, storescp, tmp_path):
    """Query, claim, update, complete and cancel; then find the CONTINUATION scheduled."""
    import datetime as dt

    from emulator.results.treatment_record import build_treatment_record, delivered_as_planned
    from tests.tms_helpers import output_item
    from tests.ups_client import final_update

    _, received_dir = storescp
    host, port = tms.addresses["TMS"]
    archive_host, archive_port = tms.addresses["ARCHIVE"]
    uids = load_sop_classes()
    with UpsClient(host, port, "TMS", "DEVICE") as client:
        worklist = {
            u.ScheduledWorkitemCodeSequence[0].CodeValue: u for u in client.worklist("LINAC1")
        }
        assert sorted(worklist) == ["121707", "121714", "121722", "121726"]
        for code_value in ("121707", "121714", "121722"):
            ups = worklist[code_value]
            status, reply = client.change_state(ups.SOPInstanceUID, "IN PROGRESS", "")
            assert status == 0x0000
            transaction = reply.TransactionUID  # seed RO-19: the TMS creates it
            update = final_update(transaction, ups.ScheduledWorkitemCodeSequence[0], "LINAC1")
            assert client.n_set(ups.SOPInstanceUID, update) == 0x0000
            status, reply = client.change_state(ups.SOPInstanceUID, "COMPLETED", transaction)
            assert (status, reply.ProcedureStepState) == (0x0000, "COMPLETED")
            assert client.change_state(ups.SOPInstanceUID, "COMPLETED", transaction)[0] == 0xB306

        delivery = worklist["121726"]
        status, reply = client.change_state(delivery.SOPInstanceUID, "IN PROGRESS", "")
        transaction = reply.TransactionUID
        assert client.n_set(delivery.SOPInstanceUID, progress(transaction, 0, beam=1)) == 0
        plan_ref = next(
            r
            for r in references_in(delivery.InputInformationSequence)
            if r.sop_class_uid == uids["rt_plan"]
        )
        subprocess.run(
            [
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
                f"SOPInstanceUID={plan_ref.sop_instance_uid}",
                archive_host,
                str(archive_port),
            ],
            check=True,
            capture_output=True,
            timeout=60,
            env=ENV,
        )
        plan = next(
            ds
            for p in Path(received_dir).iterdir()
            if (ds := dcmread(p)).SOPInstanceUID == plan_ref.sop_instance_uid
        )
        record = build_treatment_record(
            plan,
            [delivered_as_planned(plan, 1), delivered_as_planned(plan, 2, 0.5)],
            uids,
            delivery.StudyInstanceUID,
            "LINAC1",
            1,
            dt.datetime.now(),
        )
        record_path = tmp_path / "record.dcm"
        record.save_as(record_path, enforce_file_format=True)
        stored = subprocess.run(
            [
                dcmtk("storescu"),
                "-aet",
                "DEVICE",
                "-aec",
                "ARCHIVE",
                archive_host,
                str(archive_port),
                str(record_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
        assert stored.returncode == 0, stored.stderr
        assert client.n_set(delivery.SOPInstanceUID, progress(transaction, 35.0)) == 0
        reason = "beam hold: door interlock"
        assert client.n_set(delivery.SOPInstanceUID, cancellation(transaction, 35.0, reason)) == 0
        update = final_update(
            transaction,
            delivery.ScheduledWorkitemCodeSequence[0],
            "LINAC1",
            [output_item(record, "ARCHIVE")],
        )
        assert client.n_set(delivery.SOPInstanceUID, update) == 0
        status, reply = client.change_state(
            delivery.SOPInstanceUID,
            "CANCELED",
            transaction,
            ReasonForCancellation="beam hold: door interlock",
        )
        assert (status, reply.ProcedureStepState) == (0x0000, "CANCELED")
        assert float(reply.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) == 35

        continuation = client.worklist("LINAC1")
        assert len(continuation) == 4
        assert {u.ScheduledProcessingParametersSequence[0].TextValue for u in continuation} == {
            "CONTINUATION"
        }
