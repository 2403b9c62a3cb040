"""Emulated performing devices end to end against the reference TMS and Archive."""

from __future__ import annotations

import datetime as dt
from copy import deepcopy

import numpy as np
import pytest
from pydicom.uid import generate_uid

from devices.couch_axes import to_patient
from devices.geometry import rigid_parameters
from emulator.net.peers import Peer
from emulator.performer import actors
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.profile import load_sop_classes
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.reference.ups_store import UpsRecord
from emulator.seeding import SeedOptions
from emulator.ups_references import references_in
from tests.conftest import dciodvfy_errors, free_port

SMALL = SeedOptions(slices=8, rows=48, beams=3, dynamic_beams=1, control_points=10)


@pytest.fixture
def lab(tmp_path):
    """A reference site with one seeded session and devices that can be added to it."""
    started = []

    def make(kinds=("pds",), edition="ihe-ro-2008", uid_set="final", interlocks=None):
        ports = {kind: free_port() for kind in kinds}
        site = ReferenceSite(
            SiteConfig(
                data_dir=tmp_path / "site",
                tms_port=0,
                archive_port=0,
                edition=edition,
                uid_set=uid_set,
                seed_options=SMALL,
                peers=[Peer(kind.upper() + "1", "127.0.0.1", port) for kind, port in ports.items()],
            )
        )
        site.start()
        started.append(site)
        site.seed("LINAC1", 1)
        devices = {}
        for kind, port in ports.items():
            device = PerformingDevice(
                DeviceConfig(
                    kind,
                    "LINAC1",
                    kind.upper() + "1",
                    Peer("TMS", *site.tms.address),
                    Peer("ARCHIVE", *site.archive.address),
                    tmp_path / kind,
                    listen_port=port,
                    edition=edition,
                    uid_set=uid_set,
                    interlocks=dict(interlocks or {}),
                )
            )
            device.start()
            started.append(device)
            devices[kind] = device
        return site, devices

    yield make
    for item in reversed(started):
        item.stop()


def _states(site: ReferenceSite) -> dict[str, str]:
    """The state of each step of the first session scheduled (a session the TMS schedules
    again after a canceled step comes later)."""
    states: dict[str, str] = {}
    for record in site.tms.ups.select():
        states.setdefault(record.step, record.state)
    return states


def test_pds_runs_a_whole_session(lab, tmp_path):
    site, devices = lab()
    outcomes = devices["pds"].run_once()
    assert [(o.step, o.state) for o in outcomes] == [
        ("acquisition", "COMPLETED"),
        ("registration", "COMPLETED"),
        ("adjustment", "COMPLETED"),
        ("delivery", "COMPLETED"),
    ]
    assert set(_states(site).values()) == {"COMPLETED"}
    delivery = next(r for r in site.tms.ups.select() if r.step == "delivery")
    performed = delivery.dataset.UnifiedProcedureStepPerformedProcedureSequence[0]
    outputs = references_in(performed.OutputInformationSequence)
    assert [o.sop_instance_uid for o in outputs] == outcomes[3].stored
    assert performed.PerformedStationNameCodeSequence[0].CodeMeaning == "Performed Station Name"
    assert performed.NonDICOMOutputCodeSequence == []
    record = site.archive.store.read(site.archive.store.get(outputs[0].sop_instance_uid))
    assert record.StudyInstanceUID == delivery.dataset.StudyInstanceUID
    plan = next(site.archive.store.read(i) for i in site.archive.store.select("modality='RTPLAN'"))
    specified = {
        int(r.ReferencedBeamNumber): float(r.BeamMeterset)
        for r in plan.FractionGroupSequence[0].ReferencedBeamSequence
    }
    assert outcomes[3].delivered == pytest.approx(specified)
    # Every object a device produced passes dciodvfy.
    produced = [
        i
        for i in site.archive.store
        if i.values["modality"] in ("REG", "RTRECORD") or i.values["series_number"] == "30"
    ]
    cbct_slices = devices["pds"].device.profile["imaging"]["CBCT"]["slices"]
    assert len(produced) == cbct_slices + 1 + 1  # the CBCT, REG 1, record 1
    failures = {
        i.sop_instance_uid: e
        for i in produced
        if (e := dciodvfy_errors(site.archive.store.path_for(i.sha256)))
    }
    assert failures == {}


def test_pps_and_tdd_share_one_session(lab):
    site, devices = lab(("pps", "tdd"))
    assert [o.step for o in devices["tdd"].run_once()] == ["delivery"]
    states = _states(site)
    assert states["delivery"] == "COMPLETED" and states["acquisition"] == "SCHEDULED"
    pps = devices["pps"].run_once()
    assert [(o.step, o.state) for o in pps] == [
        ("acquisition", "COMPLETED"),
        ("registration", "COMPLETED"),
        ("adjustment", "COMPLETED"),
    ]
    assert set(_states(site).values()) == {"COMPLETED"}


def test_a_restart_between_steps_carries_on_with_the_acquired_images(lab):
    """The device process ends after the CBCT; the next one registers that CBCT."""
    site, devices = lab(("pps",))
    first = devices["pps"]
    steps = actors.select("pps", first.query_worklist())
    acquisition = first.perform(*steps[0])
    assert (acquisition.step, acquisition.state) == ("acquisition", "COMPLETED")
    first.stop()

    with PerformingDevice(first.config) as second:
        outcomes = second.run_once()
        couch = second.device.couch
        session = actors.session_label(steps[0][1])
        assert second.journal.session(session) is None  # ended with the session
    assert [(o.step, o.state) for o in outcomes] == [
        ("registration", "COMPLETED"),
        ("adjustment", "COMPLETED"),
    ]
    registration = site.archive.store.read(site.archive.store.get(outcomes[0].stored[0]))
    registered = {
        ref.ReferencedSOPInstanceUID
        for entry in registration.RegistrationSequence
        for ref in entry.get("ReferencedImageSequence", [])
    }
    assert set(acquisition.stored) <= registered
    # The correction the second process applied is the one the registration holds.
    matrix = registration.RegistrationSequence[-1].MatrixRegistrationSequence[0]
    stored = matrix.MatrixSequence[0].FrameOfReferenceTransformationMatrix
    shift, turn = rigid_parameters(np.array(stored, dtype=float).reshape(4, 4))
    # The table top moved by that correction, in its own axes (HFS: IEC 61217 lateral x,
    # longitudinal z, vertical -y of the patient).
    moved_translation, moved_rotation = to_patient(couch, "HFS")
    assert moved_translation == pytest.approx(shift, abs=1e-5) and all(shift)
    # yaw always; pitch and roll only over 40 mm of overlap (this CT has 30 mm: none)
    assert moved_rotation == pytest.approx(turn, abs=1e-4) and turn[2] != 0
    assert set(_states(site).values()) == {"COMPLETED", "SCHEDULED"}


def test_adjustment_without_a_registration_is_canceled_not_a_null_move(lab):
    site, devices = lab(("pps",))
    device = devices["pps"]
    adjustment = next(su for su in actors.select("pps", device.query_worklist())
                      if su[0] == "adjustment")  # fmt: skip
    outcome = device.perform(*adjustment)
    assert outcome.state == "CANCELED"
    assert "couch correction is unknown" in outcome.reason
    assert _states(site)["adjustment"] == "CANCELED"


def test_interruption_and_continuation_add_up_to_the_plan(lab):
    site, devices = lab(interlocks={2: 41.5})
    first = devices["pds"].run_once()
    interrupted = first[-1]
    assert interrupted.state == "CANCELED" and "MACHINE" in interrupted.reason
    assert interrupted.delivered[2] == pytest.approx(41.5)
    canceled = next(r for r in site.tms.ups.select() if r.state == "CANCELED")
    progress = canceled.dataset.ProcedureStepProgressInformationSequence[0]
    assert 0 < float(progress.ProcedureStepProgress) < 100
    assert "dosimetry interlock" in str(progress.ReasonForCancellation)
    assert progress.ProcedureStepCancellationDateTime
    # An interlock is an equipment failure in CID 9300 (profiles/discontinuation_reasons.yaml).
    code = progress.ProcedureStepDiscontinuationReasonCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("110501", "DCM")
    assert len(site.tms.continuations) == 1

    second = devices["pds"].run_once()
    assert [o.state for o in second] == ["COMPLETED"] * 4
    assert second[-1].delivery_type == "CONTINUATION"
    total = {}
    for beams in (interrupted.delivered, second[-1].delivered):
        for number, meterset in beams.items():
            total[number] = total.get(number, 0.0) + meterset
    assert total == pytest.approx({1: 100.0, 2: 100.0, 3: 100.0}, abs=1e-3)
    records = [site.archive.store.read(i) for i in site.archive.store.select("modality='RTRECORD'")]
    continuation = next(r for r in records if "ReferencedTreatmentRecordSequence" in r)
    beams = {int(b.ReferencedBeamNumber): b for b in continuation.TreatmentSessionBeamSequence}
    assert beams[2].TreatmentDeliveryType == "CONTINUATION"
    first_record = next(r for r in records if r is not continuation)
    assert (
        continuation.ReferencedTreatmentRecordSequence[0].ReferencedSOPInstanceUID
        == first_record.SOPInstanceUID
    )
    interrupted_beam = next(
        b for b in first_record.TreatmentSessionBeamSequence if int(b.ReferencedBeamNumber) == 2
    )
    assert interrupted_beam.TreatmentTerminationStatus == "MACHINE"


@pytest.mark.parametrize(
    ("edition", "uid_set"),
    [("ihe-ro-2008", "final"), ("tdw-ii", "final"), ("ihe-ro-2008", "trial"), ("tdw-ii", "trial")],
)
def test_both_editions_and_both_uid_sets(lab, edition, uid_set):
    site, devices = lab(edition=edition, uid_set=uid_set)
    assert [o.state for o in devices["pds"].run_once()] == ["COMPLETED"] * 4
    delivery = next(r for r in site.tms.ups.select() if r.step == "delivery")
    assert delivery.dataset.SOPClassUID == load_sop_classes(uid_set)["ups_push"]


def _tamper(site: ReferenceSite, step: str, change) -> None:
    record = next(r for r in site.tms.ups.select() if r.step == step)

    def decide(current: UpsRecord) -> UpsRecord:
        changed = deepcopy(current.dataset)
        change(changed)
        return UpsRecord(
            current.sop_instance_uid,
            current.session_id,
            current.step,
            current.state,
            current.transaction_uid,
            False,
            changed,
        )

    site.tms.ups.transition(record.sop_instance_uid, decide)


def test_inconsistent_input_information_is_refused_safely(lab):
    site, devices = lab(("tdd",))
    _tamper(site, "delivery", lambda ds: ds.InputInformationSequence.pop(0))  # no plan
    (outcome,) = devices["tdd"].run_once()
    assert outcome.state == "REFUSED" and "exactly one RT Plan" in outcome.reason
    assert _states(site)["delivery"] == "SCHEDULED"  # never claimed


def test_input_at_an_unknown_ae_is_refused_safely(lab):
    site, devices = lab(("tdd",))

    def elsewhere(ds):
        ds.InputInformationSequence[1].DICOMRetrievalSequence[0].RetrieveAETitle = "ELSEWHERE"

    _tamper(site, "delivery", elsewhere)
    (outcome,) = devices["tdd"].run_once()
    assert outcome.state == "REFUSED" and "unknown AE 'ELSEWHERE'" in outcome.reason
    assert _states(site)["delivery"] == "SCHEDULED"


def test_plan_the_machine_cannot_deliver_is_refused_before_the_claim(lab):
    site, devices = lab(("tdd",))
    devices["tdd"].device.profile = {**devices["tdd"].device.profile, "energies_mv": [10.0]}
    (outcome,) = devices["tdd"].run_once()
    assert outcome.state == "REFUSED" and "energy 6" in outcome.reason
    assert _states(site)["delivery"] == "SCHEDULED"


def test_problem_after_the_claim_cancels_with_a_reason_and_keeps_the_record(lab):
    site, devices = lab(("tdd",))
    device = devices["tdd"]
    # The Archive goes down once the beam is on: inputs were retrieved, results cannot be
    # stored. The safe outcome is a CANCELED UPS with the reason, and the record kept.
    device.on_beam_start = lambda task: site.archive.stop()
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "RO-24" in outcome.reason
    canceled = next(r for r in site.tms.ups.select() if r.step == "delivery")
    assert canceled.state == "CANCELED"
    progress = canceled.dataset.ProcedureStepProgressInformationSequence[0]
    assert "RO-24" in str(progress.ReasonForCancellation)
    assert float(progress.ProcedureStepProgress) == 100  # all delivered, only storing failed
    kept = device.receiver.store.select("modality = 'RTRECORD'")
    assert len(kept) == 1
    record = device.receiver.store.read(kept[0])
    delivered = sum(float(b.DeliveredPrimaryMeterset) for b in record.TreatmentSessionBeamSequence)
    assert delivered == pytest.approx(sum(outcome.delivered.values()))


def test_operator_interrupt_cancels_with_operator_termination(lab):
    from devices.base import MetersetTick

    site, devices = lab(("tdd",))
    device = devices["tdd"]
    held_at: list[float] = []

    def hold_after_25(task, event):
        first_beam = task.program.beam_number == 1
        if isinstance(event, MetersetTick) and first_beam and event.meterset >= 25 and not held_at:
            held_at.append(event.meterset)  # the last meterset the dosimetry reported
            device.device.interrupt("operator: patient moved")

    device.on_event = hold_after_25
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "OPERATOR" in outcome.reason
    assert outcome.delivered == {1: pytest.approx(held_at[0])}
    record = site.archive.store.read(site.archive.store.select("modality = 'RTRECORD'")[0])
    (beam,) = record.TreatmentSessionBeamSequence
    assert beam.TreatmentTerminationStatus == "OPERATOR"
    assert float(beam.DeliveredPrimaryMeterset) == pytest.approx(held_at[0])
    assert len(site.tms.continuations) == 1


def test_a_device_error_between_beams_stores_what_the_earlier_beams_delivered(lab):
    """The gantry sticks after beam 1: nothing is on when the axis check fails before beam
    2, but beam 1's dose was given. The record of it is stored before the UPS is canceled,
    with the progress it is, so the TMS continues with exactly the beams left."""
    site, devices = lab(("tdd",))
    device = devices["tdd"]

    def stick_after_first(task):
        if task.program.beam_number == 1:
            device.device.axis_faults["gantry"] = 5.0  # set and verify fails from now on

    device.on_beam_start = stick_after_first
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "device error before beam 2" in outcome.reason
    assert list(outcome.delivered) == [1] and outcome.delivered[1] > 0
    (stored,) = outcome.stored
    record = site.archive.store.read(site.archive.store.get(stored))
    (beam,) = record.TreatmentSessionBeamSequence
    assert int(beam.ReferencedBeamNumber) == 1
    assert beam.TreatmentTerminationStatus == "NORMAL"
    assert float(beam.DeliveredPrimaryMeterset) == pytest.approx(outcome.delivered[1])
    # The record names the machine as it identified itself (profiles/machines/linac.yaml).
    identity = device.device.identify()
    assert (record.Manufacturer, record.DeviceSerialNumber) == (identity.vendor, identity.serial)
    canceled = next(r for r in site.tms.ups.select() if r.state == "CANCELED")
    progress = canceled.dataset.ProcedureStepProgressInformationSequence[0]
    assert 0 < float(progress.ProcedureStepProgress) < 100
    code = progress.ProcedureStepDiscontinuationReasonCodeSequence[0]
    assert code.CodeValue == "110501"
    assert len(site.tms.continuations) == 1


def test_a_tms_that_refuses_progress_between_beams_still_gets_the_record(lab):
    """The TMS ends the UPS under the device while beam 2 is on (an operator at the TMS):
    the progress update before beam 3 is refused, beam 3 is never switched on, and the
    record of beams 1 and 2 is stored all the same."""
    site, devices = lab(("tdd",))
    device = devices["tdd"]

    def tms_cancels_after_the_first(task):
        if task.program.beam_number == 1:
            return

        def decide(current):
            current.state = current.dataset.ProcedureStepState = "CANCELED"
            return current

        delivery = next(r for r in site.tms.ups.select() if r.step == "delivery")
        site.tms.ups.transition(delivery.sop_instance_uid, decide)

    device.on_beam_start = tms_cancels_after_the_first
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "RO-26" in outcome.reason
    assert list(outcome.delivered) == [1, 2] and all(outcome.delivered.values())
    kept = device.receiver.store.select("modality = 'RTRECORD'")
    assert len(kept) == 1
    record = device.receiver.store.read(kept[0])
    recorded = {
        int(b.ReferencedBeamNumber): float(b.DeliveredPrimaryMeterset)
        for b in record.TreatmentSessionBeamSequence
    }
    assert recorded == pytest.approx(outcome.delivered)
    assert site.archive.store.get(str(record.SOPInstanceUID)) is not None


@pytest.mark.parametrize(
    ("edition", "landed"), [("tdw-ii", True), ("tdw-ii", False), ("ihe-ro-2008", True)]
)
def test_a_kill_while_a_claim_was_on_its_way(lab, edition, landed):
    """The claim is journaled ("claiming") before its N-ACTION leaves. After a kill there:
    TDW-II (the device made the UID) cancels the UPS if the TMS took the claim, and forgets
    the claim if it never landed (the UPS is performed as usual); RO-19 2008 (the TMS made
    the UID, which never arrived) cannot end it and says so instead of guessing."""
    from emulator.performer.claim import ClaimedUps
    from emulator.performer.workflow import progress_dataset

    site, devices = lab(("pds",), edition=edition)
    first = devices["pds"]
    step, ups = actors.select("pds", first.query_worklist())[0]
    empty = first.profile.performer_may_send_empty_transaction_uid
    sent = "" if empty else str(generate_uid())
    ClaimedUps.intended(first.journal, ups, step, sent, dt.datetime.now().replace(microsecond=0))
    if landed:  # the TMS accepted it; the device died before hearing so
        probe = progress_dataset(first.profile, sent, 0.0, None)
        assert first.tms.claim(str(ups.SOPInstanceUID), sent, probe).status == 0x0000
    first.stop()
    with PerformingDevice(first.config) as second:
        outcomes = second.run_once()
    state = next(r.state for r in site.tms.ups.select() if r.step == step)
    if edition == "tdw-ii" and landed:
        assert (outcomes[0].step, outcomes[0].state) == (step, "CANCELED")
        assert "the device restarted while" in outcomes[0].reason
        assert state == "CANCELED"
    elif edition == "tdw-ii":
        assert [(o.step, o.state) for o in outcomes][:1] == [(step, "COMPLETED")]
        assert state == "COMPLETED"
    else:
        assert (outcomes[0].state, state) == ("FAILED", "IN PROGRESS")
        assert "UID never received" in outcomes[0].reason
