"""Self-check of the independent UPS peers (tests/peers) against each other on 127.0.0.1.

No product code is involved: the peers must be right on their own before they are used to
judge the product. Expected values are written here from PS3.4 Annex CC a second time, as
data, rather than read back from the peers' own tables.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from tests.peers import ups_rules
from tests.peers.event_receiver import EventReceiver
from tests.peers.ups_scp import UpsScp
from tests.peers.ups_scu import (
    UpsScu,
    cancellation_attributes,
    completion_attributes,
    progress_update,
    ups_attributes,
    worklist_query,
)
from tests.peers.ups_uids import (
    FILTERED_GLOBAL_SUBSCRIPTION,
    FINAL,
    GLOBAL_SUBSCRIPTION,
    TRIAL,
    EventType,
)

PEERS = Path(__file__).parent / "peers"
PUSH = FINAL.push
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def receiver():
    with EventReceiver("RCV_A") as rcv:
        yield rcv


@pytest.fixture
def tms(receiver):
    with UpsScp(destinations={"RCV_A": receiver.address}) as scp:
        yield scp


def scu_for(scp: UpsScp, calling_ae: str = "RCV_A", **kwargs) -> UpsScu:
    return UpsScu(HOST, scp.port, scp.ae_title, calling_ae, **kwargs)


def new_ups(scu: UpsScu, **attrs) -> str:
    uid = generate_uid()
    result = scu.create(uid, ups_attributes(**attrs))
    assert result.status == 0x0000, result
    return uid


def in_state(scu: UpsScu, state: str) -> tuple[str, str | None]:
    """A fresh UPS brought to ``state`` by the book; returns (uid, Transaction UID)."""
    uid = new_ups(scu)
    if state == "SCHEDULED":
        return uid, None
    result, tx = scu.claim(uid)
    assert result.ok, result
    if state == "COMPLETED":
        assert scu.set(uid, completion_attributes(), tx).ok
        assert scu.change_state(uid, "COMPLETED", tx).ok
    elif state == "CANCELED":
        assert scu.set(uid, cancellation_attributes(), tx).ok
        assert scu.change_state(uid, "CANCELED", tx).ok
    return uid, tx


# ------------------------------------------------------------------------------ flow
def test_create_find_subscribe_claim_progress_cancel(tms, receiver):
    """The whole TDW-II shaped flow; every event carries Affected SOP Class = UPS Push."""
    with scu_for(tms, "RCV_A") as device, scu_for(tms, "OBSERVER") as observer:
        uid = generate_uid()
        assert device.create(uid, ups_attributes(station=("TB1", "99TMS", "TB1"))).ok

        found = device.find(worklist_query(station="TB1"))
        assert found.ok and [str(m.SOPInstanceUID) for m in found.matches] == [uid]
        assert found.sop_class_uid == FINAL.pull == found.context_uid
        assert all(m.SOPClassUID == PUSH and "TransactionUID" not in m for m in found.matches)

        sub = device.subscribe("global", deletion_lock=False)
        assert sub.ok and sub.sop_class_uid == PUSH and sub.context_uid == FINAL.watch

        claimed, tx = device.claim(uid)
        assert claimed.ok and claimed.sop_class_uid == PUSH and claimed.context_uid == FINAL.pull
        for percent in (10, 40, 75):
            assert device.set(uid, progress_update(percent), tx).ok

        cancel = observer.request_cancel(
            uid,
            reason="Patient unwell",
            reason_code=("110515", "DCM", "Patient condition prevented continuing"),
            contact_name="Dr Peer",
            contact_uri="tel:+1-555-0100",
        )
        assert cancel.ok and cancel.sop_class_uid == PUSH and cancel.context_uid == FINAL.push

        asked = receiver.wait_for(lambda e: e.event_type_id == EventType.CANCEL_REQUESTED)
        assert asked is not None
        assert asked.event_information.RequestingAE == "OBSERVER"
        assert asked.event_information.ReasonForCancellation == "Patient unwell"
        assert asked.event_information.ContactDisplayName == "Dr Peer"

        # The performer honours it: Final State "X" attributes, then CANCELED (CC.2.1.2).
        assert device.set(uid, cancellation_attributes(progress=75), tx).ok
        assert device.change_state(uid, "CANCELED", tx).ok
        final = receiver.wait_for(
            lambda e: e.event_information.get("ProcedureStepState") == "CANCELED"
        )
        assert final is not None and final.affected_sop_instance_uid == uid
        assert final.event_information.ProcedureStepDiscontinuationReasonCodeSequence

        got = device.get(uid, ["ProcedureStepState", "TransactionUID", "SOPClassUID"])
        assert got.ok and got.dataset.ProcedureStepState == "CANCELED"
        assert "TransactionUID" not in got.dataset and got.dataset.SOPClassUID == PUSH

    assert tms.wait_events_sent()
    events = receiver.events_for(uid)
    assert events and {e.affected_sop_class_uid for e in events} == {PUSH}
    assert {e.context_uid for e in events} == {FINAL.event}
    assert {e.calling_ae for e in events} == {tms.ae_title}
    assert [e.event_type_id for e in events if e.event_type_id == EventType.PROGRESS_REPORT]
    assert tms.progress_values(uid) == [10.0, 40.0, 75.0, 75.0]
    times = [r.time for r in tms.set_requests(uid)]
    assert times == sorted(times)
    assert {r.sop_class_uid for r in tms.requests if r.kind.startswith("N-")} == {PUSH}
    errors = [(v.kind, v.clause) for v in tms.violations if v.severity == "error"]
    assert errors == [("N-GET", "PS3.4 CC.2.7.2")]  # the deliberate request above


# ------------------------------------------------------------------------------ state table
# Table CC.1.1-2 with Table CC.2.1-2, as spec-notes.md summarises it (written out again).
# uid: "right" = the recorded UID (a fresh one for SCHEDULED), "wrong", "missing".
STATE_CASES = [
    ("SCHEDULED", "IN PROGRESS", "right", 0x0000),
    ("SCHEDULED", "IN PROGRESS", "missing", 0xC301),
    ("IN PROGRESS", "IN PROGRESS", "right", 0xC302),
    ("IN PROGRESS", "IN PROGRESS", "wrong", 0xC302),
    ("COMPLETED", "IN PROGRESS", "right", 0xC300),
    ("CANCELED", "IN PROGRESS", "right", 0xC300),
    ("SCHEDULED", "COMPLETED", "right", 0xC310),
    ("IN PROGRESS", "COMPLETED", "right", 0x0000),  # with the final-state attributes set
    ("IN PROGRESS", "COMPLETED", "right-unmet", 0xC304),
    ("COMPLETED", "COMPLETED", "right", 0xB306),
    ("CANCELED", "COMPLETED", "right", 0xC300),
    ("SCHEDULED", "CANCELED", "right", 0xC310),
    ("IN PROGRESS", "CANCELED", "right", 0x0000),
    ("IN PROGRESS", "CANCELED", "right-unmet", 0xC304),
    ("COMPLETED", "CANCELED", "right", 0xC300),
    ("CANCELED", "CANCELED", "right", 0xB304),
    ("SCHEDULED", "COMPLETED", "missing", 0xC301),
    ("IN PROGRESS", "COMPLETED", "wrong", 0xC301),
    ("IN PROGRESS", "COMPLETED", "missing", 0xC301),
    ("IN PROGRESS", "CANCELED", "wrong", 0xC301),
    ("COMPLETED", "COMPLETED", "wrong", 0xC301),
    ("CANCELED", "CANCELED", "wrong", 0xC301),
    ("SCHEDULED", "SCHEDULED", "right", 0xC303),
    ("IN PROGRESS", "SCHEDULED", "right", 0xC303),
    ("COMPLETED", "SCHEDULED", "right", 0xC303),
]


@pytest.fixture(scope="module")
def state_peer():
    with UpsScp() as scp, UpsScu(HOST, scp.port, scp.ae_title, "PERFORMER") as scu:
        yield scp, scu


@pytest.mark.parametrize(("current", "requested", "uid_kind", "expected"), STATE_CASES)
def test_state_table(state_peer, current, requested, uid_kind, expected):
    scp, scu = state_peer
    uid, tx = in_state(scu, current)
    if requested == "COMPLETED" and current == "IN PROGRESS" and uid_kind != "right-unmet":
        assert scu.set(uid, completion_attributes(), tx).ok
    if requested == "CANCELED" and current == "IN PROGRESS" and uid_kind != "right-unmet":
        assert scu.set(uid, cancellation_attributes(), tx).ok
    given = {"right": tx or generate_uid(), "right-unmet": tx, "wrong": generate_uid()}.get(
        uid_kind
    )
    result = scu.change_state(uid, requested, given)
    assert result.status == expected, f"{current}->{requested} ({uid_kind}): {result}"
    after = scp.state_of(uid)
    assert after == (requested if expected == 0x0000 else current)


def test_unknown_ups_and_free_text_cancel(state_peer):
    scp, scu = state_peer
    assert scu.change_state(generate_uid(), "IN PROGRESS", generate_uid()).status == 0xC307
    uid, tx = in_state(scu, "IN PROGRESS")
    text_only = Dataset()
    item = Dataset()
    item.ProcedureStepCancellationDateTime = "20300101081000"
    item.ReasonForCancellation = "free text is not a coded reason"
    text_only.ProcedureStepProgressInformationSequence = [item]
    assert scu.set(uid, text_only, tx).ok
    assert scu.change_state(uid, "CANCELED", tx).status == 0xC304
    assert "DiscontinuationReasonCodeSequence" in scp.violations[-1].message


def test_transaction_uid_never_returned(state_peer):
    _, scu = state_peer
    uid, _ = in_state(scu, "IN PROGRESS")
    query = worklist_query(state="IN PROGRESS", sop_instance_uid=uid)
    query.TransactionUID = ""
    found = scu.find(query)
    assert found.ok and len(found.matches) == 1 and "TransactionUID" not in found.matches[0]
    got = scu.get(uid, [])
    assert got.ok and "TransactionUID" not in got.dataset and got.dataset.SOPInstanceUID == uid


# ------------------------------------------------------------------------------ CC.3.1
def test_strict_refusal_of_non_push_requested_class(tms):
    with scu_for(tms, "RCV_A") as scu:
        uid = new_ups(scu)
        legacy_sub = scu.subscribe(uid, legacy=True)
        assert legacy_sub.status == 0x0118 and legacy_sub.sop_class_uid == FINAL.watch
        legacy_claim, _ = scu.claim(uid, legacy=True)
        assert legacy_claim.status == 0x0118 and legacy_claim.sop_class_uid == FINAL.pull
        assert scu.set(uid, progress_update(5), legacy=True).status == 0x0118
        assert scu.get(uid, ["ProcedureStepState"], context="pull", legacy=True).status == 0x0118
        assert scu.request_cancel(uid, context="watch", legacy=True).status == 0x0118
        assert tms.state_of(uid) == "SCHEDULED"
        # Right class, wrong service group (Tables CC.2-1 .. CC.2-5): 0211H.
        wrong_group = scu.change_state(uid, "IN PROGRESS", generate_uid(), context="watch")
        assert wrong_group.status == 0x0211
        assert tms.state_of(uid) == "SCHEDULED"
    clauses = [v.clause for v in tms.violations]
    assert sum("CC.3.1" in c for c in clauses) == 5
    assert any("CC.2.3.2" in c for c in clauses) and any("CC.2.1.2" in c for c in clauses)
    assert any("CC.2-1" in c for c in clauses)


def test_lenient_scp_records_but_accepts_legacy(receiver):
    with UpsScp(destinations={"RCV_A": receiver.address}, strict_sop_class=False) as scp:
        with scu_for(scp, "RCV_A", legacy=True) as scu:
            uid = new_ups(scu)
            assert scu.subscribe(uid).ok
            result, _ = scu.claim(uid)
            assert result.ok and result.sop_class_uid == FINAL.pull
        assert scp.state_of(uid) == "IN PROGRESS"
        assert len([v for v in scp.violations if "CC.3.1" in v.clause]) == 2


# ------------------------------------------------------------------------------ events
def test_ups_assigned_after_create_with_station(tms, receiver):
    with scu_for(tms, "RCV_A") as scu:
        assert scu.subscribe("global").ok
        with_station = new_ups(scu, station=("TB2", "99TMS", "Linac TB2"))
        without = new_ups(scu, station=None)
        performer = Dataset()
        performer.HumanPerformerCodeSequence = [ups_rules.code_item("RTT1", "99TMS", "Therapist")]
        performer.HumanPerformerName = "Radiation^Therapist"
        performer.HumanPerformerOrganization = "Peer Clinic"
        with_performer = new_ups(scu, station=None, ScheduledHumanPerformersSequence=[performer])
    assigned = receiver.wait_for(
        lambda e: (
            e.event_type_id == EventType.ASSIGNED and e.affected_sop_instance_uid == with_station
        )
    )
    assert assigned is not None and assigned.affected_sop_class_uid == PUSH
    assert assigned.event_information.ScheduledStationNameCodeSequence[0].CodeValue == "TB2"
    by_performer = receiver.wait_for(
        lambda e: (
            e.event_type_id == EventType.ASSIGNED and e.affected_sop_instance_uid == with_performer
        )
    )
    assert by_performer is not None
    assert "ScheduledHumanPerformersSequence" in by_performer.event_information
    assert tms.wait_events_sent()
    assert [e.event_type_id for e in receiver.events_for(without)] == [EventType.STATE_REPORT]
    report = receiver.events_for(with_station, EventType.STATE_REPORT)[0]
    assert report.event_information.ProcedureStepState == "SCHEDULED"
    assert report.event_information.InputReadinessState == "READY"


def test_scp_status_change_and_receiver_strictness():
    with (
        EventReceiver("STRICT", require_push=True) as strict,
        UpsScp(destinations={"STRICT": strict.address}, legacy_events=True) as scp,
    ):
        with scu_for(scp, "STRICT") as scu:
            uid = new_ups(scu)
            assert scu.subscribe(uid).ok
        event = strict.wait_for(lambda e: e.affected_sop_instance_uid == uid)
        assert event is not None and event.affected_sop_class_uid == FINAL.event
        assert scp.wait_events_sent()
        assert [e.status for e in scp.events_sent_to("STRICT")] == [0x0118]
    with EventReceiver("PLAIN") as plain, UpsScp(destinations={"PLAIN": plain.address}) as scp:
        with scu_for(scp, "PLAIN") as scu:
            assert scu.subscribe("global", deletion_lock=True).ok
        scp.announce_status("GOING DOWN")
        event = plain.wait_for(lambda e: e.event_type_id == EventType.SCP_STATUS_CHANGE)
        assert event is not None and event.affected_sop_instance_uid == GLOBAL_SUBSCRIPTION
        assert event.event_information.SCPStatus == "GOING DOWN"
    assert plain.wait_for(lambda e: False, timeout=0.05) is None


# ------------------------------------------------------------------------------ Table CC.2.3-2
def test_subscription_table_as_data():
    table = ups_rules.SUBSCRIPTION_TABLE
    not_sub = ups_rules.NOT_SUBSCRIBED
    assert table["Subscribe Globally (Lock TRUE)"].instance[not_sub] == (ups_rules.WITH_LOCK, True)
    assert table["Subscribe Globally (Lock FALSE)"].instance[not_sub] == (
        ups_rules.WITHOUT_LOCK,
        False,
    )
    assert table["Subscribe (instance, Lock FALSE)"].instance[not_sub][1] is True
    assert table["Suspend Global Subscription"].instance[ups_rules.WITH_LOCK] == (
        ups_rules.WITH_LOCK,
        False,
    )
    assert table["Unsubscribe Globally"].instance[ups_rules.WITHOUT_LOCK] == (not_sub, False)
    # Instance-specific instructions take precedence over global ones (CC.2.3).
    assert table["Subscribe Globally (Lock TRUE)"].instance[ups_rules.WITHOUT_LOCK][0] == (
        ups_rules.WITHOUT_LOCK
    )


def test_subscription_state_transitions_and_initial_reports():
    with (
        EventReceiver("AE_LOCK") as a,
        EventReceiver("AE_NOLOCK") as b,
        EventReceiver("AE_ONE") as c,
    ):
        destinations = {"AE_LOCK": a.address, "AE_NOLOCK": b.address, "AE_ONE": c.address}
        with UpsScp(destinations=destinations) as scp, scu_for(scp, "ADMIN") as scu:
            first, second = new_ups(scu), new_ups(scu)

            assert scu.subscribe("global", "AE_LOCK", deletion_lock=True).ok
            assert scu.subscribe("global", "AE_NOLOCK", deletion_lock=False).ok
            assert scp.wait_events_sent()
            assert sorted(e.affected_sop_instance_uid for e in a.events) == sorted([first, second])
            assert {e.event_type_id for e in a.events} == {EventType.STATE_REPORT}
            assert b.events == []  # without lock: no initial State Reports
            assert scp.subscription_state("AE_LOCK", first) == ups_rules.WITH_LOCK
            assert scp.subscription_state("AE_NOLOCK", first) == ups_rules.WITHOUT_LOCK

            third = new_ups(scu, station=None)
            assert a.wait_for(lambda e: e.affected_sop_instance_uid == third)
            assert b.wait_for(lambda e: e.affected_sop_instance_uid == third)

            assert scu.suspend_global("AE_NOLOCK").ok
            assert scp.global_state("AE_NOLOCK") == ups_rules.NO_GLOBAL
            fourth = new_ups(scu, station=None)
            _, tx = scu.claim(first)
            assert b.wait_for(
                lambda e: (
                    e.affected_sop_instance_uid == first
                    and e.event_information.get("ProcedureStepState") == "IN PROGRESS"
                )
            ), "suspend keeps the existing instance subscriptions"
            assert scp.wait_events_sent()
            assert b.events_for(fourth) == []
            assert scp.subscription_state("AE_NOLOCK", fourth) == ups_rules.NOT_SUBSCRIBED

            assert scu.unsubscribe("global", "AE_LOCK").ok
            assert scp.global_state("AE_LOCK") == ups_rules.NO_GLOBAL
            assert all(
                scp.subscription_state("AE_LOCK", u) == ups_rules.NOT_SUBSCRIBED
                for u in (first, second, third, fourth)
            )
            before = len(a.events)
            assert scu.set(first, progress_update(50), tx).ok
            assert scp.wait_events_sent() and len(a.events) == before

            assert scu.subscribe(fourth, "AE_ONE", deletion_lock=False).ok
            initial = c.wait_for(lambda e: e.affected_sop_instance_uid == fourth)
            assert initial is not None and initial.event_type_id == EventType.STATE_REPORT
            assert scu.unsubscribe(fourth, "AE_ONE").ok
            assert scp.subscription_state("AE_ONE", fourth) == ups_rules.NOT_SUBSCRIBED

            assert scu.subscribe("global", "NOBODY").status == 0xC308
            assert scu.subscribe(generate_uid(), "AE_ONE").status == 0xC307
            keys = Dataset()
            keys.ReceivingAE = "AE_ONE"
            keys.DeletionLock = "FALSE"
            keys.ScheduledStationNameCodeSequence = [ups_rules.code_item("TB1", "99TMS", "TB1")]
            assert scu.action(3, FILTERED_GLOBAL_SUBSCRIPTION, keys).status == 0xC307
            receiving = Dataset()
            receiving.ReceivingAE = "AE_ONE"
            assert scu.action(5, first, receiving).status == 0xC314


def test_internal_creation_and_scp_generated_transaction_uid(receiver):
    """CC.2.5.3 (creation by internal logic) and the IHE-RO 2008 RO-19 variant option."""
    with (
        UpsScp(destinations={"RCV_A": receiver.address}, scp_generates_transaction_uid=True) as scp,
        scu_for(scp, "RCV_A") as scu,
    ):
        assert scu.subscribe("global", deletion_lock=True).ok
        uid = generate_uid()
        scp.create_internal(uid, ups_attributes())
        assert receiver.wait_for(lambda e: e.affected_sop_instance_uid == uid)
        claimed = scu.change_state(uid, "IN PROGRESS", None)
        assert claimed.ok and claimed.dataset.TransactionUID
        assert scu.set(uid, progress_update(20), claimed.dataset.TransactionUID).ok


# ------------------------------------------------------------------------------ cancel
def test_request_cancel_statuses(tms, receiver):
    with scu_for(tms, "RCV_A") as scu, scu_for(tms, "OBSERVER") as observer:
        assert scu.subscribe("global").ok
        scheduled = new_ups(scu)
        assert observer.request_cancel(scheduled, reason="not needed").ok
        assert tms.state_of(scheduled) == "CANCELED"
        item = tms.get_ups(scheduled).ProcedureStepProgressInformationSequence[0]
        assert item.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue
        assert item.ProcedureStepCancellationDateTime
        states = receiver.wait_for_count(
            lambda e: (
                e.affected_sop_instance_uid == scheduled
                and e.event_information.get("ProcedureStepState") in ("IN PROGRESS", "CANCELED")
            ),
            2,
        )
        assert [e.event_information.ProcedureStepState for e in states] == [
            "IN PROGRESS",
            "CANCELED",
        ]
        assert observer.request_cancel(scheduled).status == 0xB304
        done, _ = in_state(scu, "COMPLETED")
        assert observer.request_cancel(done).status == 0xC311
        assert observer.request_cancel(generate_uid()).status == 0xC307
        assert scu.unsubscribe("global").ok
        lonely, _ = in_state(scu, "IN PROGRESS")
        assert observer.request_cancel(lonely).status == 0xC312


# ------------------------------------------------------------------------------ N-CREATE
def _drop(keyword):
    def mutate(ds):
        del ds[keyword]

    return mutate


def _put(keyword, value):
    def mutate(ds):
        setattr(ds, keyword, value)

    return mutate


CREATE_CASES = [
    ("missing priority", _drop("ScheduledProcedureStepPriority"), 0x0120),
    ("missing label", _drop("ProcedureStepLabel"), 0x0120),
    ("missing start", _drop("ScheduledProcedureStepStartDateTime"), 0x0120),
    ("missing readiness", _drop("InputReadinessState"), 0x0120),
    ("empty label", _put("ProcedureStepLabel", ""), 0x0121),
    ("bad priority", _put("ScheduledProcedureStepPriority", "URGENT"), 0x0106),
    ("bad readiness", _put("InputReadinessState", "MAYBE"), 0x0106),
    ("not SCHEDULED", _put("ProcedureStepState", "IN PROGRESS"), 0xC309),
    ("no state", _drop("ProcedureStepState"), 0xC309),
    ("transaction uid", _put("TransactionUID", "1.2.3.4"), 0x0106),
    ("sop class uid", _put("SOPClassUID", PUSH), 0x0105),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), CREATE_CASES)
def test_create_validation(state_peer, name, mutate, expected):
    scp, scu = state_peer
    ds = ups_attributes()
    mutate(ds)
    uid = generate_uid()
    assert scu.create(uid, ds).status == expected, name
    assert uid not in scp.ups


def test_create_uid_rules(state_peer):
    scp, scu = state_peer
    uid = generate_uid()
    ds = ups_attributes()
    ds.SOPInstanceUID = uid
    assert scu.create(uid, ds, strip_instance_uid=False).status == 0x0105
    assert scu.create(uid, ds).ok  # the helper strips it: the UID travels in the command
    assert scu.create(uid, ups_attributes()).status == 0x0111
    stored = scp.get_ups(uid)
    assert stored.SOPClassUID == PUSH and stored.SOPInstanceUID == uid
    lean = ups_attributes()
    del lean.InputInformationSequence
    del lean.WorklistLabel
    lean_uid = generate_uid()
    assert scu.create(lean_uid, lean).ok  # Type 2 missing: accepted, recorded
    assert scp.get_ups(lean_uid).WorklistLabel == scp.worklist_label
    assert any(v.severity == "warning" and "Type 2" in v.message for v in scp.violations)


# ------------------------------------------------------------------------------ N-SET / C-FIND
def test_set_rules(state_peer):
    scp, scu = state_peer
    uid, _ = in_state(scu, "SCHEDULED")
    comment = Dataset()
    comment.CommentsOnTheScheduledProcedureStep = "moved to TB2"
    assert scu.set(uid, comment).ok  # CC.2.6.2: SCHEDULED, without Transaction UID
    assert scu.set(uid, comment, generate_uid()).status == 0xC310
    uid, tx = in_state(scu, "IN PROGRESS")
    assert scu.set(uid, progress_update(1)).status == 0xC301
    assert scu.set(uid, progress_update(1), generate_uid()).status == 0xC301
    state = Dataset()
    state.ProcedureStepState = "COMPLETED"
    assert scu.set(uid, state, tx).status == 0x0105
    assert scp.state_of(uid) == "IN PROGRESS"
    done, tx = in_state(scu, "COMPLETED")
    assert scu.set(done, progress_update(100), tx).status == 0xC300
    assert scu.set(generate_uid(), comment).status == 0xC307


def test_find_matching():
    with UpsScp() as scp, UpsScu(HOST, scp.port, scp.ae_title, "FINDER") as scu:
        a = new_ups(scu, station=("TB1", "99TMS", "TB1"), start="20300101080000", patient_id="P1")
        b = new_ups(scu, station=("TB2", "99TMS", "TB2"), start="20300102093000", patient_id="P2")
        c = new_ups(scu, station=("TB1", "99TMS", "TB1"), start="20300103100000", patient_id="P3")
        scu.claim(c)

        def uids(query):
            result = scu.find(query)
            assert result.ok
            return sorted(str(m.SOPInstanceUID) for m in result.matches)

        assert uids(worklist_query(state=None)) == sorted([a, b, c])  # universal
        assert uids(worklist_query(station="TB1")) == [a]  # SCHEDULED only
        assert uids(worklist_query(station="TB1", state="IN PROGRESS")) == [c]
        assert uids(worklist_query(state=None, start_range="20300101-20300102")) == sorted([a, b])
        assert uids(worklist_query(state=None, start_range="20300102100000-")) == [c]
        assert uids(worklist_query(state=None, patient_id="P2")) == [b]
        assert uids(worklist_query(state=None, patient_id="P*")) == sorted([a, b, c])
        assert uids(worklist_query(state=None, sop_instance_uid=f"{a}\\{c}")) == sorted([a, c])

        narrow = Dataset()
        narrow.SOPInstanceUID = b
        narrow.PatientID = ""
        narrow.ProcedureStepLabel = ""
        match = scu.find(narrow).matches[0]
        assert sorted(e.keyword for e in match) == [
            "PatientID",
            "ProcedureStepLabel",
            "SOPClassUID",
            "SOPInstanceUID",
        ]
        assert match.SOPClassUID == PUSH and match.PatientID == "P2"
        absent = Dataset()
        absent.SOPInstanceUID = b
        absent.ExpectedCompletionDateTime = ""
        reply = scu.find(absent).matches[0]
        assert "ExpectedCompletionDateTime" in reply and reply.ExpectedCompletionDateTime == ""


# ------------------------------------------------------------------------------ trial UIDs
def test_trial_uid_set():
    with (
        EventReceiver("RCV_T", uid_set="trial") as rcv,
        UpsScp(uid_set="trial", destinations={"RCV_T": rcv.address}) as scp,
    ):
        with UpsScu(HOST, scp.port, scp.ae_title, "RCV_T", uid_set="trial") as scu:
            assert set(scu.accepted_contexts) >= {TRIAL.push, TRIAL.pull, TRIAL.watch}
            assert scu.subscribe("global").ok
            uid = new_ups(scu)
            claimed, _ = scu.claim(uid)
            assert claimed.ok and claimed.sop_class_uid == TRIAL.push
            assert scu.find(worklist_query(state="IN PROGRESS")).matches
        event = rcv.wait_for(
            lambda e: e.event_information.get("ProcedureStepState") == "IN PROGRESS"
        )
        assert event is not None
        assert event.affected_sop_class_uid == TRIAL.push
        assert event.context_uid == TRIAL.event
        assert scp.get_ups(uid).SOPClassUID == TRIAL.push
    with (
        UpsScp() as final_scp,  # a final-only TMS accepts none of the trial contexts
        UpsScu(HOST, final_scp.port, final_scp.ae_title, "X", uid_set="trial") as scu,
    ):
        assert not set(scu.accepted_contexts) & set(TRIAL.all_ups)


# ------------------------------------------------------------------------------ store / move
def _ct(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_storage_and_move():
    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    dest = AE(ae_title="DEST")
    dest.supported_contexts = StoragePresentationContexts
    server = dest.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        with UpsScp(destinations={"DEST": server.server_address}) as scp:
            one, two = generate_uid(), generate_uid()
            scp.add_object(_ct(one))
            sender = AE(ae_title="SENDER")
            sender.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
            sender.add_requested_context("1.2.840.10008.5.1.4.1.2.2.2")
            assoc = sender.associate(HOST, scp.port, ae_title=scp.ae_title)
            assert assoc.is_established
            assert assoc.send_c_store(_ct(two)).Status == 0x0000
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = "1.2.3.4.5"
            query.SeriesInstanceUID = "1.2.3.4.5.6"
            query.SOPInstanceUID = [one, two]
            statuses = [
                s.Status for s, _ in assoc.send_c_move(query, "DEST", "1.2.840.10008.5.1.4.1.2.2.2")
            ]
            assert statuses[-1] == 0x0000
            unknown = [
                s.Status
                for s, _ in assoc.send_c_move(query, "NOWHERE", "1.2.840.10008.5.1.4.1.2.2.2")
            ]
            assert unknown[-1] == 0xA801
            assoc.release()
            assert sorted(received) == sorted([one, two])
            assert sorted(scp.store.moves[0].sop_instance_uids) == sorted([one, two])
            assert scp.store.moves[0].destination == "DEST"
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------ hygiene
ALLOWED_TOP = {"pydicom", "pynetdicom"}
FORBIDDEN_TOP = {"emulator", "devices", "profiles", "hil", "tests"}


def test_peers_import_only_stdlib_pydicom_pynetdicom():
    """Every peer module, the independent controller (tests/peers/controller) included,
    which may also use numpy and scipy to image its anatomy."""
    files = sorted(PEERS.rglob("*.py"))
    assert len(files) >= 12 and any(p.parent.name == "controller" for p in files)
    problems = []
    for path in files:
        allowed = ALLOWED_TOP | ({"numpy", "scipy"} if path.parent.name == "controller" else set())
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must stay inside tests/peers
                    if node.module and node.module.split(".")[0] in FORBIDDEN_TOP:
                        problems.append(f"{path.name}: from .{node.module}")
                    if node.level > 1 + (path.parent.name == "controller"):
                        problems.append(f"{path.name}: relative import above peers")
                    continue
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                problems.append(f"{path.name}: dynamic __import__")
                continue
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in FORBIDDEN_TOP or (
                    top not in allowed and top not in sys.stdlib_module_names
                ):
                    problems.append(f"{path.name}: import {name}")
    assert problems == []


def test_state_table_lookups_match_spec_notes():
    lookup = ups_rules.state_transition
    assert lookup("SCHEDULED", "IN PROGRESS", "unrecorded") == ups_rules.RECORD_TRANSACTION_UID
    assert lookup("IN PROGRESS", "COMPLETED", "right") == ups_rules.CHECK_FINAL_STATE
    assert lookup("COMPLETED", "COMPLETED", "right") == 0xB306
    assert lookup("CANCELED", "CANCELED", "wrong") == 0xC301
    assert lookup("CANCELED", "SCHEDULED", "missing") == 0xC303
    assert lookup("IN PROGRESS", "PAUSED", "right") == 0x0115
    assert ups_rules.matches(Dataset(), Dataset())  # no matching keys: universal
