"""The reference Archive over real associations on 127.0.0.1, driven by pynetdicom SCUs."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from emulator.net import scu
from emulator.net.peers import Peer, PeerError
from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes
from emulator.reference.archive import ArchiveConfig, ArchiveServer

PLANNER, DEVICE, ARCHIVE = "PLANNER", "DEVICE", "ARCHIVE"


def identifier(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def receiver(tmp_path):
    with StorageReceiver(
        tmp_path / "device", DEVICE, load_sop_classes().archive_storage_uids(), [ARCHIVE]
    ) as rx:
        yield rx


@pytest.fixture
def archive(tmp_path, receiver, patient_files):
    host, port = receiver.address
    config = ArchiveConfig(
        data_dir=tmp_path / "archive",
        ae_title=ARCHIVE,
        port=0,
        peers=[Peer(DEVICE, host, port)],
        allowed_callers=[PLANNER],
    )
    with ArchiveServer(config) as server:
        peer = Peer(ARCHIVE, *server.address)
        scu.store(PLANNER, peer, patient_files)
        yield server, peer


def test_every_stored_object_is_indexed(archive, patient_files):
    server, _ = archive
    assert server.store.count() == len(patient_files)


def test_study_level_find_returns_computed_keys(archive, patient):
    _, peer = archive
    found = scu.find(
        DEVICE,
        peer,
        identifier(
            "STUDY",
            PatientID="FIX0001",
            StudyInstanceUID="",
            PatientName="",
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
            StudyDescription="",
        ),
    )
    assert len(found) == 1
    study = found[0]
    assert study.StudyInstanceUID == patient.context.study_instance_uid
    assert study.PatientName == "TDW^Fixture"
    assert set(study.ModalitiesInStudy) == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE", "PLAN"}
    assert study.NumberOfStudyRelatedSeries == 5
    assert study.NumberOfStudyRelatedInstances == len(patient.all_objects())
    assert study.RetrieveAETitle == ARCHIVE
    assert study.QueryRetrieveLevel == "STUDY"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientName": "TDW^Fix*"}, 1),
        ({"PatientName": "tdw^fix*"}, 0),  # matching is case-sensitive
        ({"PatientName": "TDW^Fixtur?"}, 1),
        ({"PatientID": "FIX0002"}, 0),
        ({"StudyDate": "19000101-"}, 1),
        ({"StudyDate": "-19000101"}, 0),
        ({"AccessionNumber": ""}, 1),  # universal matching
    ],
)
def test_study_matching_kinds(archive, keys, expected):
    _, peer = archive
    found = scu.find(DEVICE, peer, identifier("STUDY", StudyInstanceUID="", **keys))
    assert len(found) == expected


def test_series_level_and_uid_list_matching(archive, patient):
    _, peer = archive
    series = scu.find(
        DEVICE,
        peer,
        identifier(
            "SERIES",
            StudyInstanceUID=patient.context.study_instance_uid,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    by_modality = {s.Modality: s for s in series}
    assert by_modality["CT"].NumberOfSeriesRelatedInstances == len(patient.ct)
    uid_list = "\\".join([patient.plan.SOPInstanceUID, patient.dose.SOPInstanceUID])
    images = scu.find(DEVICE, peer, identifier("IMAGE", SOPInstanceUID=uid_list, SOPClassUID=""))
    assert {i.SOPInstanceUID for i in images} == {
        patient.plan.SOPInstanceUID,
        patient.dose.SOPInstanceUID,
    }


def test_image_level_returns_keys_read_from_the_object(archive, patient):
    _, peer = archive
    found = scu.find(
        DEVICE,
        peer,
        identifier(
            "IMAGE",
            SOPInstanceUID=patient.plan.SOPInstanceUID,
            RTPlanLabel="",
            ReferencedStructureSetSequence=[],
            OperatorsName="",
        ),
    )
    assert len(found) == 1
    assert found[0].RTPlanLabel == patient.plan.RTPlanLabel
    assert found[0].ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == (
        patient.structure_set.SOPInstanceUID
    )


def test_key_below_query_level_is_refused(archive):
    _, peer = archive
    with pytest.raises(scu.DimseError) as excinfo:
        scu.find(DEVICE, peer, identifier("STUDY", SeriesInstanceUID=""))
    assert excinfo.value.status == 0xA900


def test_move_plan_and_ct_series_to_a_configured_peer(archive, receiver, patient):
    server, peer = archive
    plan = scu.move(
        DEVICE, peer, identifier("IMAGE", SOPInstanceUID=patient.plan.SOPInstanceUID), DEVICE
    )
    assert (plan.status, plan.completed, plan.failed) == (0x0000, 1, 0)
    ct = scu.move(
        DEVICE,
        peer,
        identifier(
            "SERIES",
            StudyInstanceUID=patient.context.study_instance_uid,
            SeriesInstanceUID=patient.ct[0].SeriesInstanceUID,
        ),
        DEVICE,
    )
    assert (ct.completed, ct.failed) == (len(patient.ct), 0)
    for ds in [patient.plan, *patient.ct]:
        received = receiver.store.get(ds.SOPInstanceUID)
        assert received is not None
        assert receiver.store.read(received) == server.store.read(
            server.store.get(ds.SOPInstanceUID)
        )


def test_move_to_unknown_destination_is_refused(archive, patient):
    _, peer = archive
    with pytest.raises(scu.DimseError) as excinfo:
        scu.move(
            DEVICE,
            peer,
            identifier("IMAGE", SOPInstanceUID=patient.plan.SOPInstanceUID),
            "STRANGER",
        )
    assert excinfo.value.status == 0xA801


def test_move_matching_nothing_succeeds_with_no_suboperations(archive):
    _, peer = archive
    result = scu.move(DEVICE, peer, identifier("IMAGE", SOPInstanceUID="1.2.3.4"), DEVICE)
    assert (result.status, result.completed) == (0x0000, 0)


def test_unknown_calling_ae_is_rejected(archive):
    _, peer = archive
    with pytest.raises(scu.DimseError, match="rejected"):
        scu.echo("INTRUDER", peer)


def test_accept_any_ae(tmp_path):
    config = ArchiveConfig(data_dir=tmp_path, ae_title=ARCHIVE, port=0, accept_any_ae=True)
    with ArchiveServer(config) as server:
        assert scu.echo("ANYBODY", Peer(ARCHIVE, *server.address)) == 0x0000


def test_archive_without_any_allowed_caller_refuses_to_start(tmp_path):
    server = ArchiveServer(ArchiveConfig(data_dir=tmp_path, port=0))
    with pytest.raises(PeerError, match="no caller would be accepted"):
        server.start()
    server.stop()


def test_unexpected_sop_class_is_not_negotiated(archive):
    _, peer = archive
    ae = AE(ae_title=PLANNER)
    mr_spectroscopy = "1.2.840.10008.5.1.4.1.1.4.2"
    ae.requested_contexts = [
        build_context(Verification),
        build_context(mr_spectroscopy, ExplicitVRLittleEndian),
    ]
    assoc = ae.associate(peer.host, peer.port, ae_title=ARCHIVE)
    try:
        assert assoc.is_established
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [Verification]
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == [mr_spectroscopy]
    finally:
        assoc.release()
