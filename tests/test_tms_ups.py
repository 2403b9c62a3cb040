"""The reference TMS as a UPS SCP: RO-17 rules, matching, the whole state table, claims."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from emulator.ups_references import references_in
from tests.ups_client import (
    GLOBAL_SUBSCRIPTION,
    UpsClient,
    cancellation,
    code,
    final_update,
    progress,
)

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)
ARCHIVE_AE, TMS_AE = "ARCHIVE", "TMS"


@pytest.fixture
def make_site(tmp_path):
    started: list = []

    def factory(edition: str = "ihe-ro-2008", uid_set: str = "final", sessions: int = 1):
        receiver = StorageReceiver(
            tmp_path / f"device{len(started)}",
            "DEVICE",
            load_sop_classes(uid_set).archive_storage_uids(),
            [ARCHIVE_AE, TMS_AE],
        )
        receiver.start()
        site = ReferenceSite(
            SiteConfig(
                data_dir=tmp_path / f"site{len(started)}",
                tms_port=0,
                archive_port=0,
                peers=[Peer("DEVICE", *receiver.address)],
                allowed_callers=["DEVICE2"],
                edition=edition,
                uid_set=uid_set,
                seed_options=SMALL,
            )
        )
        site.start()
        started.append((site, receiver))
        for index in range(1, sessions + 1):
            site.seed("LINAC1", index)
        return site, receiver

    yield factory
    for site, receiver in started:
        site.stop()
        receiver.stop()


def client(site: ReferenceSite, calling: str = "DEVICE", uids: str = "final") -> UpsClient:
    host, port = site.tms.address
    return UpsClient(host, port, TMS_AE, calling, uids)


def by_code(worklist: list[Dataset]) -> dict[str, Dataset]:
    return {ups.ScheduledWorkitemCodeSequence[0].CodeValue: ups for ups in worklist}


@pytest.mark.parametrize(
    ("edition", "concept"),
    [("ihe-ro-2008", ("2008001", "99IHERO2008")), ("tdw-ii", ("121740", "DCM"))],
)
def test_ro17_exactly_four_ups_with_their_inputs(make_site, edition, concept):
    site, _ = make_site(edition)
    with client(site) as tms:
        worklist = tms.worklist("LINAC1")
    assert len(worklist) == 4
    codes = by_code(worklist)
    assert set(codes) == {"121707", "121714", "121722", "121726"}
    for ups in worklist:
        assert ups.SOPClassUID == "1.2.840.10008.5.1.4.34.6.1"  # Push, not Pull
        assert ups.ProcedureStepState == "SCHEDULED"
        assert "TransactionUID" not in ups
        assert ups.ProcedureStepLabel and ups.StudyInstanceUID and ups.PatientID
        station = ups.ScheduledStationNameCodeSequence[0]
        assert station.CodeValue == "LINAC1" and station.CodeMeaning
        assert ups.ScheduledWorkitemCodeSequence[0].CodingSchemeDesignator == "DCM"
        parameter = ups.ScheduledProcessingParametersSequence[0]
        assert parameter.ValueType == "TEXT" and parameter.TextValue == "TREATMENT"
        name = parameter.ConceptNameCodeSequence[0]
        assert (name.CodeValue, name.CodingSchemeDesignator) == concept
        assert name.CodeMeaning == "Treatment Delivery Type"
    ct_refs = references_in(codes["121707"].InputInformationSequence)
    assert len(ct_refs) == SMALL.slices and {r.retrieve_ae_title for r in ct_refs} == {ARCHIVE_AE}
    assert len({r.series_instance_uid for r in ct_refs}) == 1
    assert codes["121714"].InputInformationSequence == []
    assert codes["121722"].InputInformationSequence == []
    delivery = {r.sop_class_uid: r for r in references_in(codes["121726"].InputInformationSequence)}
    uids = load_sop_classes()
    assert set(delivery) == {uids["rt_plan"], uids["rt_beams_delivery_instruction"]}
    assert delivery[uids["rt_plan"]].retrieve_ae_title == ARCHIVE_AE
    assert delivery[uids["rt_beams_delivery_instruction"]].retrieve_ae_title == TMS_AE


def test_tdw_ii_schedules_plan_and_fraction_parameters(make_site):
    site, _ = make_site("tdw-ii")
    with client(site) as tms:
        ups = tms.worklist("LINAC1")[0]
    names = [
        p.ConceptNameCodeSequence[0].CodeValue for p in ups.ScheduledProcessingParametersSequence
    ]
    assert names == ["121740", "2018001", "2018002", "2018003"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, 4),
        ({"PatientName": "TDW^Phantom*"}, 4),
        ({"PatientName": "TDW^Other*"}, 0),
        ({"PatientID": "TDW0001"}, 4),
        ({"PatientID": "TDW000?"}, 4),
        ({"ScheduledProcedureStepStartDateTime": "19990101000000-19991231235959"}, 0),
        ({"ScheduledProcedureStepStartDateTime": ""}, 4),
        ({"ProcedureStepState": "IN PROGRESS"}, 0),
    ],
)
def test_matching_keys(make_site, keys, expected):
    site, _ = make_site()
    with client(site) as tms:
        assert len(tms.worklist("LINAC1", **keys)) == expected


def test_station_matching(make_site):
    site, _ = make_site()
    with client(site) as tms:
        assert len(tms.worklist("LINAC2")) == 0
        assert len(tms.worklist("LINAC*")) == 4
        assert len(tms.worklist("")) == 4  # universal


def _registration(tms: UpsClient) -> Dataset:
    return by_code(tms.worklist("LINAC1"))["121714"]


def _bring_to(tms: UpsClient, uid: str, state: str, workitem: Dataset) -> str:
    """Puts a fresh UPS into ``state`` the way a performer would; returns its Transaction UID."""
    transaction = str(generate_uid())
    if state == "SCHEDULED":
        return transaction
    assert tms.change_state(uid, "IN PROGRESS", transaction)[0] == 0x0000
    assert tms.n_set(uid, final_update(transaction, workitem, "LINAC1")) == 0x0000
    assert tms.n_set(uid, progress(transaction, 40.0)) == 0x0000
    if state == "COMPLETED":
        assert tms.change_state(uid, "COMPLETED", transaction)[0] == 0x0000
    elif state == "CANCELED":
        assert tms.n_set(uid, cancellation(transaction, 40.0, "couch fault")) == 0x0000
        status, _ = tms.change_state(
            uid, "CANCELED", transaction, ReasonForCancellation="couch fault"
        )
        assert status == 0x0000
    return transaction


# PS3.4 Table CC.1.1-2 as spec-notes gives it: (current state, request, UID) -> status.
STATE_TABLE = [
    ("SCHEDULED", "IN PROGRESS", "new", 0x0000),
    ("SCHEDULED", "COMPLETED", "right", 0xC310),
    ("SCHEDULED", "CANCELED", "right", 0xC310),
    ("SCHEDULED", "COMPLETED", "missing", 0xC301),
    ("SCHEDULED", "SCHEDULED", "right", 0xC303),
    ("IN PROGRESS", "IN PROGRESS", "new", 0xC302),
    ("IN PROGRESS", "COMPLETED", "right", 0x0000),
    ("IN PROGRESS", "CANCELED", "right", 0x0000),
    ("IN PROGRESS", "COMPLETED", "wrong", 0xC301),
    ("IN PROGRESS", "CANCELED", "missing", 0xC301),
    ("IN PROGRESS", "SCHEDULED", "right", 0xC303),
    ("COMPLETED", "IN PROGRESS", "new", 0xC300),
    ("COMPLETED", "COMPLETED", "right", 0xB306),
    ("COMPLETED", "CANCELED", "right", 0xC300),
    ("COMPLETED", "COMPLETED", "wrong", 0xC301),
    ("COMPLETED", "SCHEDULED", "right", 0xC303),
    ("CANCELED", "IN PROGRESS", "new", 0xC300),
    ("CANCELED", "COMPLETED", "right", 0xC300),
    ("CANCELED", "CANCELED", "right", 0xB304),
    ("CANCELED", "CANCELED", "wrong", 0xC301),
    ("CANCELED", "SCHEDULED", "right", 0xC303),
]


@pytest.mark.parametrize(("state", "request_state", "uid_kind", "expected"), STATE_TABLE)
def test_state_table_row(make_site, state, request_state, uid_kind, expected):
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        uid = ups.SOPInstanceUID
        transaction = _bring_to(tms, uid, state, ups.ScheduledWorkitemCodeSequence[0])
        sent = {
            "new": str(generate_uid()),
            "right": transaction,
            "wrong": str(generate_uid()),
            "missing": None,
        }[uid_kind]
        reason = {"ReasonForCancellation": "test"} if request_state == "CANCELED" else {}
        if request_state == "CANCELED" and state == "IN PROGRESS":
            assert tms.n_set(uid, cancellation(transaction, 40.0, "test")) == 0x0000
        status, reply = tms.change_state(uid, request_state, sent, **reason)
        assert status == expected, f"{state} + {request_state} ({uid_kind})"
        if status == 0x0000:  # the reply carries the state the UPS went to
            assert reply.ProcedureStepState == request_state
        elif status in (0xB304, 0xB306):  # already there: the reply says where it is
            assert reply.ProcedureStepState == state
        status, current = tms.n_get(uid, [0x00741000])
        after = {0x0000: request_state}.get(expected, state)
        assert current.ProcedureStepState == after


def test_completed_reply_echoes_state_and_full_progress(make_site):
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        transaction = _bring_to(
            tms, ups.SOPInstanceUID, "IN PROGRESS", ups.ScheduledWorkitemCodeSequence[0]
        )
        status, reply = tms.change_state(ups.SOPInstanceUID, "COMPLETED", transaction)
    assert status == 0x0000
    assert reply.ProcedureStepState == "COMPLETED"
    assert float(reply.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) == 100


def _drop_priority(site: ReferenceSite, uid: str) -> None:
    """A UPS as another scheduler might have left it: no Scheduled Procedure Step Priority."""

    def decide(current):
        del current.dataset.ScheduledProcedureStepPriority
        return current

    site.tms.ups.transition(uid, decide)


def _human_performer(with_name: bool) -> Dataset:
    performer = Dataset()
    performer.HumanPerformerCodeSequence = Sequence([code("RTT1", "99LOCAL", "Therapist")])
    if with_name:
        performer.HumanPerformerName = "Doe^Jane"
    return performer


# One case per Final State Code of PS3.4 Table CC.2.5-3, each the attribute a final
# transition may lack: how to break it, the state it blocks, the attribute the comment names.
FINAL_STATE_CASES = {
    "R": ("COMPLETED", "ScheduledProcedureStepPriority"),
    "RC": ("COMPLETED", "HumanPerformerName"),
    "P": ("COMPLETED", "PerformedWorkitemCodeSequence"),
    "X": ("CANCELED", "ProcedureStepDiscontinuationReasonCodeSequence"),
}


def _prepare(site, tms, ups, transaction: str, final_code: str, missing: bool) -> None:
    """Sets a claimed UPS up for its final transition, short of one attribute if asked."""
    uid = str(ups.SOPInstanceUID)
    workitem = ups.ScheduledWorkitemCodeSequence[0]
    update = final_update(transaction, workitem, "LINAC1")
    performed = update.UnifiedProcedureStepPerformedProcedureSequence[0]
    if final_code == "P" and missing:
        del performed.PerformedWorkitemCodeSequence
    if final_code == "RC":
        performed.ActualHumanPerformersSequence = Sequence([_human_performer(not missing)])
    assert tms.n_set(uid, update) == 0x0000
    if final_code == "R" and missing:
        _drop_priority(site, uid)
    if final_code == "X":
        cancel = cancellation(transaction, 40.0, "couch fault")
        if missing:
            del cancel.ProcedureStepProgressInformationSequence[
                0
            ].ProcedureStepDiscontinuationReasonCodeSequence
        assert tms.n_set(uid, cancel) == 0x0000


@pytest.mark.parametrize("final_code", sorted(FINAL_STATE_CASES))
@pytest.mark.parametrize("missing", [True, False], ids=["missing", "present"])
def test_final_state_code_is_enforced(make_site, final_code, missing):
    """Each Final State Code: a final transition short of one attribute is refused with
    C304 and an Error Comment naming it; with the attribute, the same one is accepted."""
    target, attribute = FINAL_STATE_CASES[final_code]
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        transaction = str(generate_uid())
        assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0
        _prepare(site, tms, ups, transaction, final_code, missing)
        status, _ = tms.change_state(ups.SOPInstanceUID, target, transaction)
        comment = tms.last_error_comment
        _, current = tms.n_get(ups.SOPInstanceUID, [0x00741000])
    if missing:
        assert status == 0xC304
        assert attribute in comment, comment
        assert current.ProcedureStepState == "IN PROGRESS"
    else:
        assert status == 0x0000, comment
        assert current.ProcedureStepState == target


def test_free_text_alone_does_not_cancel(make_site):
    """Reason For Cancellation in the N-ACTION (the seed's RO-18) does not meet Final State
    X: the progress item with its date-time and coded reason must have been set."""
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        transaction = str(generate_uid())
        assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0
        status, _ = tms.change_state(
            ups.SOPInstanceUID, "CANCELED", transaction, ReasonForCancellation="patient unwell"
        )
        assert status == 0xC304
        assert "ProcedureStepProgressInformationSequence" in tms.last_error_comment
        assert tms.n_set(ups.SOPInstanceUID, cancellation(transaction, 0.0, "unwell")) == 0
        status, reply = tms.change_state(
            ups.SOPInstanceUID, "CANCELED", transaction, ReasonForCancellation="patient unwell"
        )
        assert status == 0x0000
        assert float(reply.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) == 0


def test_unknown_ups_is_c307(make_site):
    site, _ = make_site()
    with client(site) as tms:
        unknown = str(generate_uid())
        assert tms.change_state(unknown, "IN PROGRESS", str(generate_uid()))[0] == 0xC307
        assert tms.n_set(unknown, progress(str(generate_uid()), 10)) == 0xC307
        assert tms.n_get(unknown)[0] == 0xC307


def test_seed_variant_tms_creates_the_transaction_uid(make_site):
    site, _ = make_site("ihe-ro-2008")
    with client(site) as tms:
        ups = _registration(tms)
        status, reply = tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", "")
        assert status == 0x0000 and reply.ProcedureStepState == "IN PROGRESS"
        created = reply.TransactionUID
        assert created
        assert tms.n_set(ups.SOPInstanceUID, progress(created, 5)) == 0x0000
        assert tms.n_set(ups.SOPInstanceUID, progress(str(generate_uid()), 5)) == 0xC301


def test_tdw_ii_requires_the_performer_transaction_uid(make_site):
    site, _ = make_site("tdw-ii")
    with client(site) as tms:
        ups = _registration(tms)
        assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", "")[0] == 0xC301
        status, reply = tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", str(generate_uid()))
        assert status == 0x0000 and "TransactionUID" not in reply


def test_n_set_rules_and_n_get_hides_the_transaction_uid(make_site):
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        uid = ups.SOPInstanceUID
        transaction = str(generate_uid())
        assert tms.n_set(uid, progress(transaction, 0)) == 0xC310  # still SCHEDULED
        tms.change_state(uid, "IN PROGRESS", transaction)
        assert tms.n_set(uid, progress(str(generate_uid()), 10)) == 0xC301
        bad = progress(transaction, 10)
        bad.ProcedureStepState = "COMPLETED"
        assert tms.n_set(uid, bad) == 0x0106  # the state never changes by N-SET
        assert tms.n_set(uid, progress(transaction, 25, beam=1)) == 0x0000
        status, ups_now = tms.n_get(uid)
        assert status == 0 and "TransactionUID" not in ups_now
        assert ups_now.ProcedureStepState == "IN PROGRESS"
        assert (
            float(ups_now.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) == 25
        )
        _bring_final = final_update(transaction, ups.ScheduledWorkitemCodeSequence[0], "LINAC1")
        tms.n_set(uid, _bring_final)
        tms.change_state(uid, "COMPLETED", transaction)
        assert tms.n_set(uid, progress(transaction, 10)) == 0xC300  # final: no more updates


def test_request_cancel(make_site):
    site, _ = make_site(sessions=2)
    with client(site) as tms:
        worklist = tms.worklist("LINAC1")
        first, second = (
            by_code([u for u in worklist if u.PatientID == pid])
            for pid in sorted({u.PatientID for u in worklist})
        )
        scheduled = first["121722"].SOPInstanceUID
        assert tms.request_cancel(scheduled, "patient did not attend") == 0x0000
        assert tms.n_get(scheduled)[1].ProcedureStepState == "CANCELED"
        assert tms.request_cancel(scheduled) == 0xB304
        # The delivery after the canceled adjustment cannot run: the TMS ended it too, with
        # what Final State X requires (docs/tms.md); the earlier steps are left as they were.
        _, delivery = tms.n_get(first["121726"].SOPInstanceUID)
        assert delivery.ProcedureStepState == "CANCELED"
        item = delivery.ProcedureStepProgressInformationSequence[0]
        assert item.ProcedureStepCancellationDateTime
        assert item.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110529"
        ups = first["121714"]
        _bring_to(tms, ups.SOPInstanceUID, "COMPLETED", ups.ScheduledWorkitemCodeSequence[0])
        assert tms.request_cancel(ups.SOPInstanceUID) == 0xC311
        claimed = second["121726"].SOPInstanceUID
        assert tms.change_state(claimed, "IN PROGRESS", str(generate_uid()))[0] == 0x0000
        # Nobody subscribed to it: the performer cannot be told (PS3.4 CC.2.2.3).
        assert tms.request_cancel(claimed) == 0xC312
        assert tms.subscribe(claimed, "DEVICE") == 0x0000
        assert tms.request_cancel(claimed) == 0x0000  # recorded; the performer decides
        assert tms.n_get(claimed)[1].ProcedureStepState == "IN PROGRESS"


def test_requested_sop_class_is_push_or_the_contexts_own(make_site):
    """PS3.4 CC.3.1: every UPS request names UPS Push, on whichever context carries it; the
    TMS also takes the context's own class (docs/tms.md) and refuses any other."""
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        info = Dataset()
        info.ProcedureStepState = "IN PROGRESS"
        info.TransactionUID = str(generate_uid())
        uid = ups.SOPInstanceUID
        status, _ = tms.assoc.send_n_action(info, 1, tms.watch, uid, meta_uid=tms.pull)
        assert status.Status == 0x0118
        assert "CC.3.1" in status.ErrorComment
        status, _ = tms.assoc.send_n_action(info, 1, tms.pull, uid, meta_uid=tms.pull)
        assert status.Status == 0x0000  # the legacy form: the Pull context's own class
        # A subscription naming UPS Push on the UPS Watch context (the standard's form).
        subscribe = Dataset()
        subscribe.ReceivingAE = "DEVICE"
        subscribe.DeletionLock = "FALSE"
        status, _ = tms.assoc.send_n_action(
            subscribe, 3, tms.push, GLOBAL_SUBSCRIPTION, meta_uid=tms.watch
        )
        assert status.Status == 0x0000


def test_a_request_outside_its_contexts_service_group_is_refused(make_site):
    """PS3.4 Tables CC.2-1 to CC.2-3: Change State travels on UPS Pull, a subscription on UPS
    Watch, Request Cancel on UPS Push or Watch; elsewhere it is refused with a comment."""
    site, _ = make_site()
    with client(site) as tms:
        uid = _registration(tms).SOPInstanceUID
        info = Dataset()
        info.ProcedureStepState = "IN PROGRESS"
        info.TransactionUID = str(generate_uid())
        status, _ = tms.assoc.send_n_action(info, 1, tms.push, uid, meta_uid=tms.watch)
        assert status.Status == 0x0123
        assert status.ErrorComment == "N-ACTION 1 is not a UPS Watch service (PS3.4 Table CC.2-3)"
        cancel = Dataset()
        cancel.ReasonForCancellation = "on the wrong context"
        status, _ = tms.assoc.send_n_action(cancel, 2, tms.push, uid, meta_uid=tms.pull)
        assert status.Status == 0x0123
        assert tms.n_get(uid)[1].ProcedureStepState == "SCHEDULED"


def test_concurrent_claim_has_exactly_one_winner(make_site):
    site, _ = make_site()
    with client(site) as tms:
        uid = by_code(tms.worklist("LINAC1"))["121726"].SOPInstanceUID
    barrier = threading.Barrier(8)
    results: list[int] = []

    def claim(calling: str) -> None:
        with client(site, calling) as device:
            barrier.wait()
            results.append(device.change_state(uid, "IN PROGRESS", str(generate_uid()))[0])

    threads = [
        threading.Thread(target=claim, args=("DEVICE" if i % 2 else "DEVICE2",)) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [0x0000] + [0xC302] * 7


def test_restart_in_the_middle_of_a_session(make_site):
    site, _ = make_site()
    with client(site) as tms:
        codes = by_code(tms.worklist("LINAC1"))
        ups = codes["121714"]
        transaction = str(generate_uid())
        assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0
        assert tms.n_set(ups.SOPInstanceUID, progress(transaction, 30)) == 0
    site.stop()
    again = ReferenceSite(site.config)
    again.config.tms_port = again.config.archive_port = 0
    again = ReferenceSite(again.config)
    again.start()
    try:
        with client(again) as tms:
            assert len(tms.worklist("LINAC1")) == 3
            assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0xC302
            assert tms.n_set(ups.SOPInstanceUID, progress(str(generate_uid()), 50)) == 0xC301
            update = final_update(transaction, ups.ScheduledWorkitemCodeSequence[0], "LINAC1")
            assert tms.n_set(ups.SOPInstanceUID, update) == 0
            assert tms.change_state(ups.SOPInstanceUID, "COMPLETED", transaction)[0] == 0
    finally:
        again.stop()


def test_continuation_scheduled_after_partial_cancel(make_site):
    from tests.tms_helpers import deliver_partially_and_cancel

    site, receiver = make_site()
    outcome = deliver_partially_and_cancel(site, receiver, fractions_delivered={1: 1.0, 2: 0.4})
    with client(site) as tms:
        worklist = tms.worklist("LINAC1")
    kinds = [u.ScheduledProcessingParametersSequence[0].TextValue for u in worklist]
    # The original session's three positioning UPS are untouched; the continuation adds four.
    assert sorted(kinds) == ["CONTINUATION"] * 4 + ["TREATMENT"] * 3
    continuation = [u for u, k in zip(worklist, kinds, strict=True) if k == "CONTINUATION"]
    assert len({u.SOPInstanceUID for u in continuation}) == 4
    delivery = by_code(continuation)["121726"]
    refs = references_in(delivery.InputInformationSequence)
    uids = load_sop_classes()
    kinds = sorted(r.sop_class_uid for r in refs)
    assert kinds == sorted(
        [uids["rt_plan"], uids["rt_beams_delivery_instruction"], uids["rt_beams_treatment_record"]]
    )
    instruction = outcome.fetch_from_tms(
        next(r for r in refs if r.sop_class_uid == uids["rt_beams_delivery_instruction"])
    )
    tasks = {int(t.ReferencedBeamNumber): t for t in instruction.BeamTaskSequence}
    assert set(tasks) == {2, 3}
    assert tasks[2].TreatmentDeliveryType == "CONTINUATION"
    specified = outcome.specified[2]
    assert float(tasks[2].ContinuationStartMeterset) == pytest.approx(0.4 * specified, abs=0.01)
    assert float(tasks[2].ContinuationEndMeterset) == pytest.approx(specified)
    assert tasks[3].TreatmentDeliveryType == "TREATMENT"
    assert [int(o.ReferencedBeamNumber) for o in instruction.OmittedBeamTaskSequence] == [1]


def _explicit_find(site: ReferenceSite, identifier: Dataset) -> list[Dataset]:
    """A UPS C-FIND over Explicit VR Little Endian only, so a key's VR reaches the TMS as
    sent; returns the status datasets."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_context
    from pynetdicom.sop_class import UnifiedProcedureStepPull

    ae = AE(ae_title="DEVICE")
    ae.requested_contexts = [build_context(UnifiedProcedureStepPull, ExplicitVRLittleEndian)]
    assoc = ae.associate(*site.tms.address, ae_title=TMS_AE)
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_find(identifier, UnifiedProcedureStepPull)]
    finally:
        assoc.release()


def test_a_key_with_the_wrong_vr_gets_a900_with_a_comment_not_a_traceback(make_site):
    site, _ = make_site()
    identifier = Dataset()
    identifier.ProcedureStepState = "SCHEDULED"
    identifier.add_new(0x00404025, "LO", "LINAC1")  # ScheduledStationNameCodeSequence, as LO
    (status,) = _explicit_find(site, identifier)
    assert status.Status == 0xA900
    assert "ScheduledStationNameCodeSequence must be SQ" in status.ErrorComment


def test_a_wildcard_longer_than_its_vr_allows_is_refused(make_site):
    site, _ = make_site()
    with client(site) as tms:
        identifier = Dataset()
        identifier.ProcedureStepState = "SCHEDULED"
        identifier.PatientID = "*" + "x" * 10_000
        assert tms.find_status(identifier) == 0xC000
        identifier.PatientID = "TDW*"
        assert tms.find_status(identifier) == 0x0000


def _created_ups(**changes) -> Dataset:
    """An N-CREATE attribute list as a scheduler sends one (Table CC.2.5-3, SCU types)."""
    ds = Dataset()
    ds.TransactionUID = ""
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ScheduledProcedureStepModificationDateTime = "20261201080000"
    ds.WorklistLabel = "Bench"
    ds.ProcedureStepLabel = "Created by a TDW-II tool"
    ds.CommentsOnTheScheduledProcedureStep = ""
    ds.ScheduledStationNameCodeSequence = Sequence([code("LINAC9", "99TEST", "Linac 9")])
    ds.ScheduledStationClassCodeSequence = Sequence([])
    ds.ScheduledStationGeographicLocationCodeSequence = Sequence([])
    ds.ScheduledProcedureStepStartDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    ds.ScheduledWorkitemCodeSequence = Sequence([code("121726", "DCM", "RT Treatment")])
    ds.ScheduledProcessingParametersSequence = Sequence([])
    ds.InputReadinessState = "READY"
    ds.InputInformationSequence = Sequence([])
    ds.PatientName = "Created^Patient"
    ds.PatientID = "CRE001"
    ds.IssuerOfPatientID = ""
    ds.OtherPatientIDsSequence = Sequence([])
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = Sequence([])
    ds.AdmittingDiagnosesDescription = ""
    ds.AdmittingDiagnosesCodeSequence = Sequence([])
    ds.ReferencedRequestSequence = Sequence([])
    ds.ProcedureStepState = "SCHEDULED"
    ds.ProcedureStepProgressInformationSequence = Sequence([])
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([])
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("changes", "status", "named"),
    [
        ({}, 0x0000, ""),
        ({"ProcedureStepLabel": None}, 0x0120, "ProcedureStepLabel"),
        ({"ProcedureStepLabel": ""}, 0x0121, "ProcedureStepLabel"),
        ({"ProcedureStepState": "IN PROGRESS"}, 0xC309, "SCHEDULED"),
        ({"TransactionUID": "1.2.3"}, 0x0106, "Transaction UID"),
    ],
    ids=["complete", "missing-type-1", "empty-type-1", "not-scheduled", "transaction-uid"],
)
def test_n_create_of_a_ups_follows_the_table(make_site, changes, status, named):
    from pynetdicom import AE
    from pynetdicom.sop_class import UnifiedProcedureStepPush

    site, _ = make_site(sessions=0)
    ae = AE(ae_title="DEVICE")
    ae.add_requested_context(UnifiedProcedureStepPush)
    assoc = ae.associate(*site.tms.address, ae_title=TMS_AE)
    assert assoc.is_established
    uid = str(generate_uid())
    try:
        answer, _ = assoc.send_n_create(_created_ups(**changes), UnifiedProcedureStepPush, uid)
    finally:
        assoc.release()
    assert answer.Status == status, answer
    assert named in str(answer.get("ErrorComment", ""))
    created = site.tms.ups.get(uid)
    if status:
        assert created is None  # nothing stored for a refused request
    else:
        with client(site) as tms:
            (found,) = tms.worklist("LINAC9")
        assert found.SOPInstanceUID == uid and found.ProcedureStepState == "SCHEDULED"


def test_an_oversized_n_set_is_refused_and_nothing_is_stored(make_site):
    site, _ = make_site()
    with client(site) as tms:
        ups = _registration(tms)
        transaction = str(generate_uid())
        assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0
        big = progress(transaction, 10.0)
        big.add_new(0x00091010, "LO", "TDW")
        big.add_new(0x00091011, "OB", b"\0" * (2 << 20))  # 2 MiB of private data
        status = tms.n_set(ups.SOPInstanceUID, big)
    assert status == 0x0213
    stored = site.tms.ups.get(str(ups.SOPInstanceUID)).dataset
    assert 0x00091011 not in stored
    assert "ProcedureStepProgressInformationSequence" not in stored


# PS3.4 Table CC.2.5-3, as the standard states it, written out here independently of
# profiles/ups_attributes.yaml so that a wrong table fails a test (mutation testing).
# Final State Code P (COMPLETED) and X (CANCELED): paths into the N-SET body; R: in the UPS.
COMPLETED_REQUIRES = [
    "UnifiedProcedureStepPerformedProcedureSequence",
    "UnifiedProcedureStepPerformedProcedureSequence>PerformedStationNameCodeSequence",
    "UnifiedProcedureStepPerformedProcedureSequence>PerformedProcedureStepStartDateTime",
    "UnifiedProcedureStepPerformedProcedureSequence>PerformedWorkitemCodeSequence",
    "UnifiedProcedureStepPerformedProcedureSequence>PerformedProcedureStepEndDateTime",
    "UnifiedProcedureStepPerformedProcedureSequence>OutputInformationSequence",
]
CANCELED_REQUIRES = [
    "ProcedureStepProgressInformationSequence",
    "ProcedureStepProgressInformationSequence>ProcedureStepCancellationDateTime",
    "ProcedureStepProgressInformationSequence>ProcedureStepDiscontinuationReasonCodeSequence",
]
# R: the SCP or the scheduler set them; a UPS without one cannot end. (SOP Instance UID and
# Procedure Step State are R too, but a UPS without them is not one the TMS can find or
# move: C307 and 0110, before any final-state check.)
BOTH_REQUIRE = [
    "SOPClassUID",
    "ScheduledProcedureStepPriority",
    "ScheduledProcedureStepModificationDateTime",
    "ProcedureStepLabel",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
]
# N-SET type "Not allowed": an N-SET carrying one is refused (0x0106) and changes nothing.
N_SET_NOT_ALLOWED = {
    "SOPClassUID": "1.2.840.10008.5.1.4.34.6.1",
    "SOPInstanceUID": "1.2.3.4",
    "PatientName": "Other^Patient",
    "PatientID": "OTHER",
    "IssuerOfPatientID": "ELSEWHERE",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "AdmissionID": "A1",
    "AdmittingDiagnosesDescription": "x",
    "ProcedureStepState": "COMPLETED",
    # Sequences: one plausible item each.
    "OtherPatientIDsSequence": [("PatientID", "OTHER2"), ("TypeOfPatientID", "TEXT")],
    "IssuerOfAdmissionIDSequence": [("LocalNamespaceEntityID", "HOSPITAL")],
    "AdmittingDiagnosesCodeSequence": [
        ("CodeValue", "C34"),
        ("CodingSchemeDesignator", "I10"),
        ("CodeMeaning", "Lung"),
    ],
    "ReferencedRequestSequence": [("StudyInstanceUID", "1.2.3.4.5"), ("AccessionNumber", "A1")],
    "ReplacedProcedureStepSequence": [
        ("ReferencedSOPClassUID", "1.2.840.10008.5.1.4.34.6.1"),
        ("ReferencedSOPInstanceUID", "1.2.3.4.6"),
    ],
}


def _value(keyword: str):
    value = N_SET_NOT_ALLOWED[keyword]
    if not isinstance(value, list):
        return value
    item = Dataset()
    for name, text in value:
        setattr(item, name, text)
    return Sequence([item])


def _without(body: Dataset, path: str) -> Dataset:
    """``body`` less the attribute at ``path`` (in the first item of each sequence)."""
    *parents, keyword = path.split(">")
    node = body
    for parent in parents:
        node = node[parent].value[0]
    delattr(node, keyword)
    return body


def _claimed(tms) -> tuple[Dataset, str]:
    ups = _registration(tms)
    transaction = str(generate_uid())
    assert tms.change_state(ups.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0
    return ups, transaction


def _refused_for_lack_of(tms, ups, target: str, transaction: str, path: str) -> None:
    """The final transition is refused with C304 and an Error Comment naming what is missing."""
    status, _ = tms.change_state(ups.SOPInstanceUID, target, transaction)
    assert status == 0xC304, path
    assert path.split(">")[-1] in tms.last_error_comment, tms.last_error_comment


@pytest.mark.parametrize("path", COMPLETED_REQUIRES)
def test_completed_needs_every_final_state_p_attribute(make_site, path):
    site, _ = make_site()
    with client(site) as tms:
        ups, transaction = _claimed(tms)
        update = final_update(transaction, ups.ScheduledWorkitemCodeSequence[0], "LINAC1")
        if ">" not in path:
            update = Dataset()  # no Performed Procedure Sequence at all: no RO-21
        else:
            assert tms.n_set(ups.SOPInstanceUID, _without(update, path)) == 0x0000
        _refused_for_lack_of(tms, ups, "COMPLETED", transaction, path)
        _, current = tms.n_get(ups.SOPInstanceUID, [0x00741000])
        assert current.ProcedureStepState == "IN PROGRESS"


@pytest.mark.parametrize("path", CANCELED_REQUIRES)
def test_canceled_needs_every_final_state_x_attribute(make_site, path):
    site, _ = make_site()
    with client(site) as tms:
        ups, transaction = _claimed(tms)
        if ">" in path:
            body = _without(cancellation(transaction, 40.0, "couch fault"), path)
            assert tms.n_set(ups.SOPInstanceUID, body) == 0x0000
        _refused_for_lack_of(tms, ups, "CANCELED", transaction, path)


@pytest.mark.parametrize("keyword", BOTH_REQUIRE)
def test_both_final_states_need_every_r_attribute(make_site, keyword):
    site, _ = make_site()
    with client(site) as tms:
        ups, transaction = _claimed(tms)
        update = final_update(transaction, ups.ScheduledWorkitemCodeSequence[0], "LINAC1")
        assert tms.n_set(ups.SOPInstanceUID, update) == 0x0000

        def drop(current):
            delattr(current.dataset, keyword)
            return current

        site.tms.ups.transition(str(ups.SOPInstanceUID), drop)
        _refused_for_lack_of(tms, ups, "COMPLETED", transaction, keyword)


@pytest.mark.parametrize("keyword", sorted(N_SET_NOT_ALLOWED))
def test_an_n_set_of_a_not_allowed_attribute_is_refused(make_site, keyword):
    site, _ = make_site()
    with client(site) as tms:
        ups, transaction = _claimed(tms)
        body = progress(transaction, 10.0)
        setattr(body, keyword, _value(keyword))
        assert tms.n_set(ups.SOPInstanceUID, body) == 0x0106, keyword
        status, current = tms.n_get(ups.SOPInstanceUID, [0x00741000, 0x00100020, 0x00741002])
        assert status == 0x0000
        assert (current.ProcedureStepState, current.PatientID) == ("IN PROGRESS", ups.PatientID)
        assert not current.get("ProcedureStepProgressInformationSequence")  # nothing was set


@pytest.mark.parametrize("final", ["COMPLETED", "CANCELED"])
def test_an_n_set_after_a_final_state_is_refused(make_site, final):
    """PS3.4 CC.2.1.3: a UPS in a final state takes no more updates (C300), whichever."""
    site, _ = make_site()
    with client(site) as tms:
        ups, transaction = _claimed(tms)
        uid = ups.SOPInstanceUID
        if final == "COMPLETED":
            body = final_update(transaction, ups.ScheduledWorkitemCodeSequence[0], "LINAC1")
        else:
            body = cancellation(transaction, 0.0, "patient unwell")
        assert tms.n_set(uid, body) == 0x0000
        assert tms.change_state(uid, final, transaction)[0] == 0x0000
        assert tms.n_set(uid, progress(transaction, 10)) == 0xC300
        _, current = tms.n_get(uid, [0x00741000, 0x00741002])
        assert current.ProcedureStepState == final
        items = current.get("ProcedureStepProgressInformationSequence") or []
        assert all(float(i.get("ProcedureStepProgress", 0) or 0) != 10 for i in items)
