"""UPS Watch and UPS Event between the reference TMS, the devices and watchers (PS3.4 CC.2.3,
CC.2.4), over real associations: a TMS in its own process, a device, ``tdw-emu watch``.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time

from pydicom.dataset import Dataset

from devices.base import BeamEnded, MetersetTick
from emulator import ups_events
from emulator.cli import main
from emulator.net.event_scp import EventReceiver, UpsEventNotice
from emulator.net.peers import Peer
from emulator.performer import actors
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.profile import load_sop_classes
from emulator.soak.runner import confirmed_at_archive
from tests.conftest import REPO, free_port, start_cli_process
from tests.ups_client import GLOBAL_SUBSCRIPTION, UpsClient

STATION = "LINAC1"


def _tms(tmp_path, *peers: Peer, extra: tuple[str, ...] = ("--seed", STATION)):
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0",
        "--archive-port", "0",
        "--seed-size", "small",
        "--allow", "OPERATOR",
        *(a for p in peers for a in ("--peer", str(p))),
        *extra,
        ready="ready",
        timeout=300,
    )  # fmt: skip
    tms = Peer("TMS", "127.0.0.1", site.addresses["TMS"][1])
    archive = Peer("ARCHIVE", "127.0.0.1", site.addresses["ARCHIVE"][1])
    return site, tms, archive


def _pds(tmp_path, peer: Peer, tms: Peer, archive: Peer, time_scale: float, on_event=None):
    device = PerformingDevice(
        DeviceConfig(
            "pds",
            STATION,
            peer.ae_title,
            tms,
            archive,
            tmp_path / "pds",
            listen_port=peer.port,
            time_scale=time_scale,
        ),
        on_event=on_event,
    )
    device.start()
    return device


def test_a_cancel_requested_from_the_tms_holds_beam_2_and_is_continued(tmp_path):
    """A therapist stops the treatment from the TMS during beam 2 (time scale 0.1): the
    device hears UPS Cancel Requested, holds the beam within 1 s, records what the machine
    measured, and cancels with the TMS's reason code; the TMS schedules the rest."""
    pds_peer = Peer("PDS1", "127.0.0.1", free_port())
    site, tms, archive = _tms(tmp_path, pds_peer)
    ticks: queue.Queue = queue.Queue()
    ended: dict = {}

    def on_event(task, event) -> None:
        if isinstance(event, MetersetTick) and task.program.beam_number == 2:
            ticks.put(event.meterset)
        if isinstance(event, BeamEnded) and task.program.beam_number == 2:
            ended.update(at=time.monotonic(), event=event)

    device = _pds(tmp_path, pds_peer, tms, archive, 0.1, on_event)
    try:
        delivery_uid = next(
            str(u.SOPInstanceUID)
            for u in device.query_worklist()
            if actors.step_of(u) == "delivery"
        )
        outcomes: list = []
        runner = threading.Thread(target=lambda: outcomes.extend(device.run_once()))
        runner.start()
        ticks.get(timeout=120)  # beam 2 is on
        asked = time.monotonic()
        args = ["tms", "cancel", delivery_uid, "--tms", str(tms), "--calling-ae", "OPERATOR"]
        assert main([*args, "--reason", "patient moved"]) == 0
        runner.join(120)
        assert not runner.is_alive()
        assert ended["event"].termination.value == "OPERATOR"
        held_s = ended["at"] - asked
        print(f"beam 2 held {held_s * 1000:.0f} ms after tdw-emu tms cancel was issued")
        assert held_s < 1.0, held_s
        delivery = next(o for o in outcomes if o.step == "delivery")
        assert delivery.state == "CANCELED"
        assert "cancel requested by OPERATOR: patient moved" in delivery.reason
        planned_2 = delivery.delivered[2]
        assert 0 < planned_2 < 1e6
        # The record the Archive holds: exactly what the machine measured for beam 2.
        [record_uid] = delivery.stored
        record = confirmed_at_archive(device, record_uid)
        assert record is not None
        beam_2 = next(
            b for b in record.TreatmentSessionBeamSequence if int(b.ReferencedBeamNumber) == 2
        )
        assert abs(float(beam_2.DeliveredPrimaryMeterset) - planned_2) < 0.01
        assert beam_2.TreatmentTerminationStatus == "OPERATOR"
        with UpsClient(tms.host, tms.port, "TMS", "OPERATOR") as client:
            status, ups = client.n_get(delivery_uid)
            assert status == 0 and ups.ProcedureStepState == "CANCELED"
            item = ups.ProcedureStepProgressInformationSequence[0]
            code = item.ProcedureStepDiscontinuationReasonCodeSequence[0]
            assert (code.CodeValue, code.CodingSchemeDesignator) == ("110500", "DCM")
            continuation = client.worklist(STATION)
        assert len(continuation) == 4
        types = {
            str(p.TextValue)
            for u in continuation
            for p in u.ScheduledProcessingParametersSequence
            if "TextValue" in p and p.TextValue in ("TREATMENT", "CONTINUATION")
        }
        assert types == {"CONTINUATION"}
    finally:
        device.stop()
        site.stop()


def test_watch_sees_every_state_change_of_a_session_in_order(tmp_path):
    pds_peer = Peer("PDS1", "127.0.0.1", free_port())
    watcher = Peer("TDWWATCH", "127.0.0.1", free_port())
    site, tms, archive = _tms(tmp_path, pds_peer, watcher)
    watch = subprocess.Popen(
        [
            sys.executable, "-m", "emulator.cli", "watch", "--tms", str(tms),
            "--listen", str(watcher), "--json", "--timeout", "120", "--lock",
            "--until", "event=ups_state_report,state=COMPLETED", "--count", "4",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    device = None
    try:
        # The watcher says so once the TMS took its subscription; with a deletion lock the
        # initial State Reports of every UPS come out (PS3.4 Table CC.2.3-2).
        said = watch.stderr.readline()
        assert "subscribed" in said and "with deletion lock" in said, said
        first = watch.stdout.readline()
        assert first.startswith("{"), first + watch.stderr.read()
        device = _pds(tmp_path, pds_peer, tms, archive, 0.0)
        outcomes = device.run_once()
        assert [o.state for o in outcomes] == ["COMPLETED"] * 4
        # Not communicate(): it reads the pipes' raw descriptors and would lose what
        # readline() above already buffered. The output is small: no pipe fills up.
        watch.wait(timeout=120)
        out, err = first + watch.stdout.read(), watch.stderr.read()
    finally:
        if device is not None:
            device.stop()
        watch.kill()
        site.stop()
    assert watch.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert not [r for r in rows if r.get("problems")], rows  # Table CC.2.4-1 attributes
    reports = [r for r in rows if r["event"] == "ups_state_report"]
    order = [o.sop_instance_uid for o in outcomes]
    for uid in order:
        states = [r["state"] for r in reports if r["ups"] == uid]
        assert states == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], (uid, states)
    # In the order the steps ran: each step completed before the next one was claimed.
    sequence = [(r["ups"], r["state"]) for r in reports if r["state"] != "SCHEDULED"]
    assert sequence == [(uid, s) for uid in order for s in ("IN PROGRESS", "COMPLETED")]
    assert any(r["event"] == "ups_progress_report" for r in rows)


def test_an_event_owed_when_the_tms_was_killed_is_delivered_after_its_restart(tmp_path):
    """The watcher is not listening when the UPS changes state, so the State Report cannot
    have left before the SIGKILL; the restarted TMS still owes it, and sends it."""
    watcher = Peer("TDWWATCH", "127.0.0.1", free_port())
    site, tms, _ = _tms(tmp_path, watcher)
    with UpsClient(tms.host, tms.port, "TMS", "OPERATOR") as client:
        assert client.subscribe(GLOBAL_SUBSCRIPTION, watcher.ae_title) == 0x0000
        ups = client.worklist(STATION)[0]
        uid = str(ups.SOPInstanceUID)
        assert client.change_state(uid, "IN PROGRESS", "1.2.826.0.1.3680043.8.498.1")[0] == 0
    site.kill()

    received: queue.Queue[UpsEventNotice] = queue.Queue()
    receiver = EventReceiver(
        watcher.ae_title,
        load_sop_classes()["ups_event"],
        received.put,
        ["TMS"],
        port=watcher.port,
    )
    receiver.start()
    site, tms, _ = _tms(tmp_path, watcher, extra=())
    try:
        seen: list[UpsEventNotice] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(received.get(timeout=1))
            kinds = [_kind(n) for n in seen]
            if ("state", uid, "IN PROGRESS") in kinds and ("scp", "RESTARTED") in kinds:
                break
        kinds = [_kind(n) for n in seen]
        # What was owed from before the kill comes first, then the TMS says it restarted.
        assert kinds.index(("state", uid, "IN PROGRESS")) < kinds.index(("scp", "RESTARTED"))
        for notice in seen:
            assert ups_events.problems(notice.event_type, notice.info) == []
    finally:
        site.stop()
        receiver.stop()


def _kind(notice: UpsEventNotice) -> tuple:
    if notice.event_type == ups_events.SCP_STATUS_CHANGE:
        return ("scp", str(notice.info.get("SCPStatus", "")))
    if notice.event_type == ups_events.STATE_REPORT:
        return ("state", notice.ups_uid, str(notice.info.get("ProcedureStepState", "")))
    return ("other", notice.event_type)


def test_watch_actions_answer_as_table_cc_2_3_2_says(tmp_path):
    watcher = Peer("TDWWATCH", "127.0.0.1", free_port())
    site, tms, _ = _tms(tmp_path, watcher)
    try:
        with UpsClient(tms.host, tms.port, "TMS", "OPERATOR") as client:
            uid = str(client.worklist(STATION)[0].SOPInstanceUID)
            assert client.subscribe(uid, "NOBODY") == 0xC308  # receiving AE unknown
            assert client.subscribe("1.2.3.4.5", watcher.ae_title) == 0xC307  # no such UPS
            assert client.subscribe(uid, watcher.ae_title, deletion_lock=True) == 0x0000
            assert client.unsubscribe(uid, watcher.ae_title) == 0x0000
            info = Dataset()
            info.ReceivingAE = watcher.ae_title
            status, _ = client.assoc.send_n_action(info, 5, client.watch, uid)
            assert status.Status == 0xC314  # suspend names the global instance only
    finally:
        site.stop()


def test_the_event_table_is_pydicom_s_dictionary():
    """Every attribute of profiles/ups_events.yaml (Table CC.2.4-1) is a real DICOM keyword,
    and every Event Type the standard defines is there."""
    from pydicom.datadict import tag_for_keyword

    assert ups_events.event_types() == [1, 2, 3, 4, 5]
    for event_type in ups_events.event_types():
        for attribute in ups_events.attributes(event_type):
            assert tag_for_keyword(attribute.keyword.lstrip(">")) is not None, attribute
    report = ups_events.scp_status_change("GOING DOWN", "WARM START")
    assert ups_events.problems(ups_events.SCP_STATUS_CHANGE, report) == []
    assert ups_events.problems(ups_events.CANCEL_REQUESTED, Dataset()) == [
        "RequestingAE missing from UPS Cancel Requested"
    ]


def test_a_subscriber_that_never_answers_delays_no_other(tmp_path):
    """A hostile subscriber accepts the association and sits on every N-EVENT-REPORT: the
    other subscriber still gets its events at once (each has its own sender)."""
    from pynetdicom import AE, evt

    slow, fast = Peer("SLOW", "127.0.0.1", free_port()), Peer("FAST", "127.0.0.1", free_port())
    site, tms, _ = _tms(tmp_path, slow, fast)
    release = threading.Event()
    stuck = AE(ae_title="SLOW")
    stuck.add_supported_context(load_sop_classes()["ups_event"])
    stuck_server = stuck.start_server(
        ("127.0.0.1", slow.port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: (release.wait(30), (0, None))[1])],
    )
    received: queue.Queue[UpsEventNotice] = queue.Queue()
    receiver = EventReceiver(fast.ae_title, load_sop_classes()["ups_event"], received.put,
                             ["TMS"], port=fast.port)  # fmt: skip
    receiver.start()
    try:
        with UpsClient(tms.host, tms.port, "TMS", "OPERATOR") as client:
            uid = str(client.worklist(STATION)[0].SOPInstanceUID)
            assert client.subscribe(uid, slow.ae_title) == 0x0000
            time.sleep(0.5)  # the slow one's sender is now stuck in its first report
            assert client.subscribe(uid, fast.ae_title) == 0x0000
            first = received.get(timeout=3)
            assert first.ups_uid == uid and first.event_type == ups_events.STATE_REPORT
            assert client.change_state(uid, "IN PROGRESS", "1.2.826.0.1.3680043.8.498.2")[0] == 0
            update = received.get(timeout=3)
            assert str(update.info.ProcedureStepState) == "IN PROGRESS"
    finally:
        release.set()
        receiver.stop()
        stuck_server.shutdown()
        site.stop()
