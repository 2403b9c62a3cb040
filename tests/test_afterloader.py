"""The HDR afterloader end to end, in process: a synthetic brachytherapy patient, the TMS's
one delivery UPS, the afterloader's checks before any source moves, delivery channel by
channel and dwell by dwell, and RT Brachy Treatment Records of exactly what the machine
measured, through faults and the continuation the TMS schedules from them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from devices.afterloader import BrachySource, ChannelEnded, ChannelTick, DwellDone
from devices.sim.afterloader import AfterloaderFaults
from emulator.brachy_fraction import recorded_source, remaining_reference_s, treated_at
from emulator.net.peers import Peer
from emulator.net.ports import free_port
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.profile import load_sop_classes
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.results.brachy_record import (
    BrachySession,
    DeliveredChannel,
    DeliveredDwell,
    build_brachy_treatment_record,
    delivered_channel_times,
    delivered_dwells,
)
from emulator.results.treatment_record import TreatmentMachine
from emulator.seeding import AFTERLOADER_SMALL
from emulator.store.importer import import_files
from emulator.synth.brachy import BrachySpec, generate_brachy_patient
from emulator.synth.brachy_access import (
    plan_integrity_problems,
    planned_channels,
    planned_source,
)
from emulator.synth.phantom import PhantomGeometry
from tests.conftest import dciodvfy_errors

STATION, AE = "HDR1", "AL1"
SMALL = PhantomGeometry(rows=32, columns=32, pixel_spacing=8.0, slices=8)
SPEC = BrachySpec(channels=3, dwells_per_channel=4, channel_time_s=20.0)


@pytest.fixture(scope="module")
def brachy():
    return generate_brachy_patient(spec=SPEC, geometry=SMALL)


def test_every_brachy_object_passes_dciodvfy(brachy, tmp_path):
    paths = brachy.write(tmp_path)
    for path in [paths[0], *paths[-3:]]:  # a CT slice, the structures, the plan, the dose
        assert dciodvfy_errors(path) == [], path.name


def test_the_plan_holds_together_and_its_dwells_sum_to_its_channel_times(brachy):
    plan = brachy.plan
    assert plan_integrity_problems(plan) == []
    assert plan.BrachyTreatmentType == "HDR" and plan.SourceSequence[0].SourceIsotopeName
    channels = planned_channels(plan)
    assert [c.channel_number for c in channels] == [1, 2, 3]
    for channel in channels:
        assert len(channel.dwells) == 4
        assert sum(d.time_s for d in channel.dwells) == pytest.approx(channel.total_time_s)
        assert [d.control_point_index for d in channel.dwells] == [0, 2, 4, 6]
    rois = {int(r.ROINumber): str(r.ROIName) for r in brachy.structure_set.StructureSetROISequence}
    assert {"CTV", "RECTUM", "BLADDER", "CATHETER 1"} <= set(rois.values())


def test_a_dwell_time_changed_on_the_way_is_caught(brachy):
    """The data arrived intact only if its own totals agree: one cumulative weight changed
    makes the channel's dwells disagree with the setup's Total Reference Air Kerma."""
    plan = Dataset()
    plan.update(brachy.plan)
    plan = replace_weight(plan, channel=1, point=3, by=2.0)
    problems = plan_integrity_problems(plan)
    assert problems and any("Total Reference Air Kerma" in p or "weight" in p for p in problems)


def replace_weight(plan: Dataset, channel: int, point: int, by: float) -> Dataset:
    from copy import deepcopy

    plan = deepcopy(plan)
    item = plan.ApplicationSetupSequence[0].ChannelSequence[channel - 1]
    cps = item.BrachyControlPointSequence
    for later in cps[point:]:
        later.CumulativeTimeWeight = f"{float(later.CumulativeTimeWeight) + by:g}"
    item.FinalCumulativeTimeWeight = cps[-1].CumulativeTimeWeight
    item.ChannelTotalTime = f"{float(item.ChannelTotalTime) + by:g}"
    return plan


def test_a_record_round_trips_dwell_by_dwell_and_passes_dciodvfy(brachy, tmp_path):
    plan, uids = brachy.plan, load_sop_classes()
    now = dt.datetime.now()
    given = {0: 3.25, 1: 4.5, 2: 1.125}  # dwell 2 interrupted part-way
    channel = planned_channels(plan)[1]
    dwells = [
        DeliveredDwell(d.index, d.control_point_index, d.position_mm, d.time_s, given[d.index], now)
        for d in channel.dwells
        if d.index in given
    ]
    record = build_brachy_treatment_record(
        plan,
        [DeliveredChannel(2, channel.length_mm, 20.0, dwells, "MACHINE", "DOOR", "door opened")],
        uids,
        BrachySession(
            str(plan.StudyInstanceUID), TreatmentMachine("TDW_HDR1"), 1, now, planned_source(plan)
        ),
    )
    assert delivered_dwells(record) == {2: [3.25, 4.5, 1.125]}
    assert delivered_channel_times(record) == {2: 8.875}
    setup = record.TreatmentSessionApplicationSetupSequence[0]
    assert setup.TreatmentTerminationStatus == "MACHINE"
    assert setup.ReferencedBrachyApplicationSetupNumber == 1
    assert record.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    path = tmp_path / "record.dcm"
    record.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


# -- sessions against the reference TMS, in process ------------------------------------------


class Session:
    """A reference site and an afterloader on free ports; every machine event kept."""

    def __init__(self, tmp_path: Path, **device: object) -> None:
        port = free_port()
        self.site = ReferenceSite(
            SiteConfig(
                data_dir=tmp_path / "site",
                tms_port=0,
                archive_port=0,
                peers=[Peer(AE, "127.0.0.1", port)],
                brachy_options=replace(AFTERLOADER_SMALL, dwells_per_channel=4, channels=3),
            )
        )
        self.site.start()
        self.events: list[object] = []
        self.device = PerformingDevice(
            DeviceConfig(
                "afterloader",
                STATION,
                AE,
                Peer("TMS", *self.site.tms.address),
                Peer("ARCHIVE", *self.site.archive.address),
                tmp_path / "device",
                listen_port=port,
                **device,
            ),
            on_event=lambda task, event: self.events.append(event),
        )
        self.device.start()

    def seed(self, patient=None) -> str:
        if patient is None:
            return self.site.seed(STATION, 1, kind="afterloader")
        paths = patient.write(Path(self.site.config.data_dir) / "extra")
        assert all(
            not isinstance(r, Exception)
            for r in import_files(self.site.archive.store, paths).values()
        )
        return self.site.tms.scheduler.schedule_session(
            patient.plan.SOPInstanceUID, STATION, dt.datetime.now(), fraction=1
        )

    def records(self) -> list[Dataset]:
        store = self.site.archive.store
        records = [store.read(i) for i in store if i.values["modality"] == "RTRECORD"]
        return sorted(records, key=lambda r: (str(r.TreatmentDate), str(r.TreatmentTime)))

    def plan(self) -> Dataset:
        store = self.site.archive.store
        (plan,) = [store.read(i) for i in store if i.values["modality"] == "RTPLAN"]
        return plan

    def ended(self) -> dict[int, float]:
        """What the machine measured, channel by channel (its ChannelEnded)."""
        measured: dict[int, float] = {}
        for event in self.events:
            if isinstance(event, ChannelEnded):
                measured[event.channel] = measured.get(event.channel, 0.0) + event.delivered_s
        return measured

    def stop(self) -> None:
        self.device.stop()
        self.site.stop()


@pytest.fixture
def session(tmp_path):
    made: list[Session] = []

    def make(**device: object) -> Session:
        made.append(Session(tmp_path, **device))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def discontinuation_code(site: ReferenceSite, uid: str) -> str:
    (workitem,) = [w for w in site.tms.ups.select() if w.sop_instance_uid == uid]
    item = workitem.dataset.ProcedureStepProgressInformationSequence[0]
    return str(item.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue)


def test_a_fraction_completes_with_a_record_of_what_the_machine_measured(session, tmp_path):
    s = session()
    s.seed()
    (outcome,) = s.device.run_once()
    assert outcome.state == "COMPLETED", outcome.reason
    (record,) = s.records()
    measured = s.ended()
    assert set(measured) == {1, 2, 3}
    for channel, seconds in delivered_channel_times(record).items():
        assert seconds == pytest.approx(measured[channel], abs=0.1)
    done = [e for e in s.events if isinstance(e, DwellDone)]
    dwells = delivered_dwells(record)
    for event in done:
        assert dwells[event.channel][event.index] == pytest.approx(event.delivered_s, abs=1e-3)
    path = tmp_path / "record.dcm"
    record.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    (workitem,) = s.site.tms.ups.select()
    assert workitem.state == "COMPLETED"


def _normalised(plan: Dataset, records: list[Dataset]) -> dict[int, float]:
    """Each channel's seconds summed over the records, each session's decay-corrected to the
    plan's source strength (the plan's own terms)."""
    strength = planned_source(plan).reference_air_kerma_rate
    total: dict[int, float] = {}
    for record in records:
        factor = recorded_source(record).strength_at(treated_at(record)) / strength
        for channel, seconds in delivered_channel_times(record).items():
            total[channel] = total.get(channel, 0.0) + seconds * factor
    return total


def test_a_door_interlock_in_channel_2_then_the_continuation_delivers_exactly_the_rest(session):
    s = session(interlocks={2: 4.0})
    s.seed()
    (first,) = s.device.run_once()
    assert first.state == "CANCELED" and "door" in first.reason
    assert discontinuation_code(s.site, first.sop_instance_uid) == "110501"  # CID 9300
    (interrupted,) = s.records()  # the one record so far
    setup = interrupted.TreatmentSessionApplicationSetupSequence[0]
    assert setup.TreatmentTerminationStatus == "MACHINE"
    assert delivered_channel_times(interrupted)[2] == pytest.approx(4.0, abs=0.1)
    done = {(e.channel, e.index): e.delivered_s for e in s.events if isinstance(e, DwellDone)}
    for channel, seconds in delivered_dwells(interrupted).items():
        for index, given in enumerate(seconds):
            if (channel, index) in done:  # every dwell finished, as measured
                assert given == pytest.approx(done[channel, index], abs=1e-3)
    assert 3 not in delivered_channel_times(interrupted)  # never reached
    (second,) = s.device.run_once()
    assert second.state == "COMPLETED", second.reason
    assert second.delivery_type == "CONTINUATION"
    plan = s.plan()
    records = s.records()
    assert len(records) == 2
    totals = _normalised(plan, records)
    for channel in planned_channels(plan):
        assert totals[channel.channel_number] == pytest.approx(channel.total_time_s, abs=0.1)
    left = remaining_reference_s(plan, records)
    assert all(s <= 0.05 for owed in left.values() for s in owed)
    kinds = {
        r.TreatmentSessionApplicationSetupSequence[0].TreatmentDeliveryType: r for r in records
    }
    ref = kinds["CONTINUATION"].ReferencedTreatmentRecordSequence[0]
    assert ref.ReferencedSOPInstanceUID == kinds["TREATMENT"].SOPInstanceUID


def test_a_plan_for_another_source_is_refused_before_any_source_moves(session):
    s = session()
    loaded = s.device.device.source()
    other = BrachySource(
        loaded.isotope,
        loaded.half_life_days,
        loaded.reference_air_kerma_rate * 1.5,
        loaded.reference,
    )
    uid = None
    s.seed(generate_brachy_patient(spec=SPEC, source=other, geometry=SMALL))
    (outcome,) = s.device.run_once()
    uid = outcome.sop_instance_uid
    assert outcome.state == "CANCELED"
    assert "source mismatch" in outcome.reason and "before any source moved" in outcome.reason
    assert discontinuation_code(s.site, uid) == "110514"
    assert not [e for e in s.events if isinstance(e, ChannelTick | DwellDone | ChannelEnded)]
    assert s.records() == []


@pytest.mark.parametrize(
    ("faults", "code", "channel"),
    [
        (AfterloaderFaults(stuck={1: 1.5}), "RETRACT", 1),
        (AfterloaderFaults(obstructed={2}), "OBSTRUCTION", 2),
        (AfterloaderFaults(power={3: 2.5}), "POWER", 3),
    ],
)
def test_each_fault_is_canceled_with_a_true_record(session, faults, code, channel):
    s = session()
    s.device.device.faults = faults
    s.seed()
    (outcome,) = s.device.run_once()
    assert outcome.state == "CANCELED" and f"({code})" in outcome.reason
    assert discontinuation_code(s.site, outcome.sop_instance_uid) == "110501"
    measured = {c: t for c, t in s.ended().items() if t > 0}
    (record,) = s.records()
    assert delivered_channel_times(record) == pytest.approx(measured, abs=0.1)
    setup = record.TreatmentSessionApplicationSetupSequence[0]
    assert setup.TreatmentTerminationStatus == "MACHINE"
    assert setup.MachineSpecificTreatmentTerminationCodeSequence[0].CodeValue == code
    ended = [e for e in s.events if isinstance(e, ChannelEnded)]
    assert ended[-1].channel == channel and ended[-1].code == code


def test_a_linac_plan_is_left_for_a_linac(session):
    s = session()
    s.site.config.seed_options = replace(
        s.site.config.seed_options, slices=3, rows=16, beams=1, dynamic_beams=0
    )
    s.site.seed(STATION, 2)  # a linac patient at the afterloader's station
    outcomes = s.device.run_once()
    assert outcomes and all(o.state == "REFUSED" for o in outcomes)
    assert all(w.state == "SCHEDULED" for w in s.site.tms.ups.select())


def test_the_brachy_record_rule_catches_totals_that_disagree_with_their_dwells(session, tmp_path):
    """RO-24/Brachy-record, as `tdw-emu validate` applies it to files at rest."""
    from emulator.conformance.object_rules import appendix_a_findings, read_files
    from emulator.conformance.rulebook import RuleBook

    s = session()
    s.seed()
    (outcome,) = s.device.run_once()
    assert outcome.state == "COMPLETED"
    (record,) = s.records()
    plan = s.plan()
    record.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    plan.save_as(tmp_path / "plan.dcm", enforce_file_format=True)
    book, uids = RuleBook.load("ihe-ro-2008"), load_sop_classes()
    objects, _ = read_files([tmp_path / "good.dcm", tmp_path / "plan.dcm"], uids)
    rules = {f.rule for f in appendix_a_findings(objects, book)}
    assert not {r for r in rules if "Brachy" in r}
    channel = record.TreatmentSessionApplicationSetupSequence[0].RecordedChannelSequence[0]
    channel.DeliveredChannelTotalTime = float(channel.DeliveredChannelTotalTime) + 1.0
    record.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    objects, _ = read_files([tmp_path / "bad.dcm", tmp_path / "plan.dcm"], uids)
    findings = [f for f in appendix_a_findings(objects, book) if "Brachy-record" in f.rule]
    assert len(findings) == 1 and "is not the sum of its dwells" in findings[0].message
