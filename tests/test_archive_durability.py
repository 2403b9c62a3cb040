"""Acknowledged means durable: kill -9 the Archive, restart it, and nothing is missing."""

from __future__ import annotations

import threading
import time
from copy import deepcopy

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.store import DuplicatePolicy, ObjectStore

CALLER = "PLANNER"


def _archive_args(data_dir) -> list[str]:
    return ["--data-dir", str(data_dir), "--ae-title", "ARCHIVE", "--port", "0", "--allow", CALLER]


def _find_all(peer: Peer) -> set[str]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.SOPInstanceUID = ""
    return {d.SOPInstanceUID for d in scu.find(CALLER, peer, ident)}


def test_restart_after_kill_keeps_everything(tmp_path, patient_files, archive_process_factory):
    first = archive_process_factory(*_archive_args(tmp_path))
    peer = Peer("ARCHIVE", first.host, first.port)
    scu.store(CALLER, peer, patient_files)
    stored = _find_all(peer)
    assert len(stored) == len(patient_files)
    first.kill()

    second = archive_process_factory(*_archive_args(tmp_path))
    peer = Peer("ARCHIVE", second.host, second.port)
    assert _find_all(peer) == stored
    assert f"{len(stored)} instances" in " ".join(second.output)  # it says what it reopened


def test_kill_during_a_store_stream_loses_nothing_acknowledged(
    tmp_path, patient, archive_process_factory
):
    proc = archive_process_factory(*_archive_args(tmp_path))
    acknowledged: dict[str, Dataset] = {}
    stop = threading.Event()

    def sender() -> None:
        ae = AE(ae_title=CALLER)
        ae.requested_contexts = [build_context(patient.ct[0].SOPClassUID)]
        assoc = ae.associate(proc.host, proc.port, ae_title="ARCHIVE")
        n = 0
        while assoc.is_established and not stop.is_set():
            ds = deepcopy(patient.ct[n % len(patient.ct)])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            status = assoc.send_c_store(ds)
            if status and status.get("Status") == 0x0000:
                acknowledged[ds.SOPInstanceUID] = ds
            n += 1

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL mid-stream: no shutdown path runs
    stop.set()
    thread.join(timeout=30)
    assert len(acknowledged) >= 20

    store = ObjectStore(tmp_path)
    try:
        for uid, sent in acknowledged.items():
            instance = store.get(uid)
            assert instance is not None, f"acknowledged {uid} lost"
            assert store.read(instance) == sent
        # Whatever was not acknowledged may be absent, but nothing half-written is indexed.
        for instance in store:
            dcmread(store.path_for(instance.sha256))
    finally:
        store.close()


def _changed_copy(ds: Dataset) -> Dataset:
    changed = deepcopy(ds)
    changed.RTPlanName = "Changed after approval"
    return changed


def test_duplicate_policy_reject_keeps_the_first(tmp_path, patient, archive_process_factory):
    proc = archive_process_factory(*_archive_args(tmp_path))
    peer = Peer("ARCHIVE", proc.host, proc.port)
    assert scu.store(CALLER, peer, [patient.plan]) == [0x0000]
    assert scu.store(CALLER, peer, [patient.plan]) == [0x0000]  # identical resend
    with pytest.raises(scu.DimseError) as excinfo:
        scu.store(CALLER, peer, [_changed_copy(patient.plan)])
    assert excinfo.value.status == 0x0111
    proc.stop()
    store = ObjectStore(tmp_path)
    try:
        kept = store.read(store.get(patient.plan.SOPInstanceUID))
        assert kept.RTPlanName == patient.plan.RTPlanName
    finally:
        store.close()


def test_duplicate_policy_replace_keeps_the_old_version(tmp_path, patient, archive_process_factory):
    proc = archive_process_factory(*_archive_args(tmp_path), "--duplicate-policy", "replace")
    peer = Peer("ARCHIVE", proc.host, proc.port)
    scu.store(CALLER, peer, [patient.plan])
    assert scu.store(CALLER, peer, [_changed_copy(patient.plan)]) == [0x0000]
    proc.stop()
    store = ObjectStore(tmp_path, DuplicatePolicy.REPLACE)
    try:
        current = store.read(store.get(patient.plan.SOPInstanceUID))
        assert current.RTPlanName == "Changed after approval"
        (old,) = store.superseded(patient.plan.SOPInstanceUID)
        assert dcmread(store.path_for(old)).RTPlanName == patient.plan.RTPlanName
    finally:
        store.close()


def test_file_names_never_come_from_peer_data(tmp_path, patient, archive_process_factory):
    proc = archive_process_factory(*_archive_args(tmp_path))
    hostile = deepcopy(patient.plan)
    hostile.PatientID = "../../etc"
    hostile.SeriesDescription = "../../../../tmp/evil"
    scu.store(CALLER, Peer("ARCHIVE", proc.host, proc.port), [hostile])
    proc.stop()
    names = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert all(".." not in str(n) and "evil" not in str(n) for n in names)
    stored = [n for n in names if n.suffix == ".dcm"]
    assert len(stored) == 1 and len(stored[0].stem) == 64  # a SHA-256, nothing else
