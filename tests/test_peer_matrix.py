"""Each side of the UPS workflow against an independent peer of ``tests/peers``.

The peers were written from PS3.4 Annex CC and the public implementations alone (they import
nothing from the product: tests/test_peer_selfcheck.py checks that), so a misreading the
product's twins share shows here:

- our device (``tdw-emu run``) against the peer UPS SCP, loaded with a vendor kit by
  N-CREATE: every request names UPS Push (CC.3.1), the SCP records no violation, the
  session completes and its progress rises;
- the peer SCUs against ``tdw-emu tms`` in its own process: find, claim, modify, subscribe
  globally and to one UPS (UPS Push on the UPS Watch context), request cancel, N-CREATE of
  the kit as written, and the events, each naming UPS Push;
- ``tdw-emu watch`` against the peer SCP's events.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from emulator.cli import main
from tests.conftest import REPO, free_port, start_archive_process, start_cli_process
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
from tests.peers.ups_uids import FINAL, GLOBAL_SUBSCRIPTION, EventType

HOST = "127.0.0.1"
PEER_TMS = "PEERTMS"


def _kit(tmp_path: Path, tms_ae: str) -> tuple[Path, dict]:
    kit = tmp_path / "kit"
    args = ["scenarios", "prepare", "--out", str(kit), "--seed-size", "small"]
    assert main([*args, "--tms-ae", tms_ae, "--archive-ae", "ARCHIVE"]) == 0
    return kit, json.loads((kit / "manifest.json").read_text())


def _station(manifest: dict, scenario: str) -> dict:
    return next(s for s in manifest["stations"] if s["scenario"] == scenario)


def test_our_device_against_the_peer_scp(tmp_path, capsys):
    """A PDS session on a TMS written from PS3.4: the kit's UPS created there by N-CREATE as
    the kit says (the UID as the Affected SOP Instance UID), the RT Beams Delivery
    Instruction served by its C-MOVE, the planning data by our Archive. The device claims
    the final standard's way (TDW-II: it makes the Transaction UID, PS3.4 CC.2.1.2); the
    seed's 2008 claim, with a zero-length UID, is refused and the device says why."""
    kit, manifest = _kit(tmp_path, PEER_TMS)
    capsys.readouterr()
    station = _station(manifest, "normal-fraction")
    device_port = free_port()
    archive = start_archive_process(
        "--data-dir", str(tmp_path / "archive"), "--port", "0",
        "--import", str(kit / "archive" / station["station"]),
        "--peer", f"PDS1@{HOST}:{device_port}",
    )  # fmt: skip
    report = tmp_path / "report"
    try:
        with UpsScp(ae_title=PEER_TMS, destinations={"PDS1": (HOST, device_port)}) as scp:
            for path in (kit / "tms" / station["station"]).glob("*.dcm"):
                scp.add_object(dcmread(path))
            session = station["sessions"][0]["ups"]
            with UpsScu(HOST, scp.port, PEER_TMS, "SCHEDULER") as scheduler:
                for entry in session:
                    attributes = Dataset.from_json((kit / entry["file"]).read_text())
                    created = scheduler.create(entry["sop_instance_uid"], attributes)
                    assert created.status == 0x0000, (entry, created)
            run = [
                "run", "--kind", "pds", "--station", station["station"],
                "--ae-title", "PDS1", "--listen-port", str(device_port),
                "--tms", f"{PEER_TMS}@{HOST}:{scp.port}",
                "--archive", f"ARCHIVE@{HOST}:{archive.port}",
                "--report-dir", str(report),
            ]  # fmt: skip
            refused_2008 = main(
                [*run, "--profile", "ihe-ro-2008", "--data-dir", str(tmp_path / "d2008")]
            )
            said_2008 = capsys.readouterr().err
            code = main([*run, "--profile", "tdw-ii", "--data-dir", str(tmp_path / "device")])
            scp.wait_events_sent(10)
            out = capsys.readouterr()
            states = {e["step"]: scp.state_of(e["sop_instance_uid"]) for e in session}
            device_requests = [r for r in scp.requests if r.calling_ae.strip() == "PDS1"]
            violations = list(scp.violations)
            delivery = next(e["sop_instance_uid"] for e in session if e["step"] == "delivery")
            progress = scp.progress_values(delivery)
    finally:
        archive.stop()
    assert refused_2008 == 1
    assert "claim refused (0xC301" in said_2008 and "--profile tdw-ii" in said_2008, said_2008
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    assert states == dict.fromkeys(("acquisition", "registration", "adjustment", "delivery"),
                                   "COMPLETED")  # fmt: skip
    assert violations == [], violations
    normalized = [r for r in device_requests if r.kind in ("N-ACTION", "N-SET", "N-GET")]
    assert normalized and {r.sop_class_uid for r in normalized} == {FINAL.push}
    subscriptions = [r for r in normalized if r.kind == "N-ACTION" and r.action_type == 3]
    assert subscriptions and {r.context_uid for r in subscriptions} == {FINAL.watch}
    assert progress[0] == 0 and progress[-1] == 100, progress
    assert all(b >= a for a, b in itertools.pairwise(progress)), progress


def _tms_process(tmp_path: Path, *peers: str, extra: tuple[str, ...] = ()):
    args = ["--data-dir", str(tmp_path / "site"), "--port", "0", "--archive-port", "0"]
    for peer in peers:
        args += ["--peer", peer]
    return start_cli_process("tms", *args, *extra, ready="ready")


def _with_type_2(ds: Dataset) -> Dataset:
    """The peer's N-CREATE data set with all our TMS holds an SCU to: every Type 1 and 2
    attribute of Table CC.2.5-3 (a Type 2 present, zero length). The peer's builder leaves
    some Type 2 out, which its own SCP accepts with a warning; ours refuses (0120)."""
    from emulator import ups_attributes

    for row in ups_attributes.table():
        if row.n_create.split("/")[0].strip() in ("1", "2") and row.keyword not in ds:
            setattr(ds, row.keyword, [] if row.is_sequence else None)
    ds.ScheduledProcedureStepModificationDateTime = "20300101070000"  # Type 1/1
    return ds


def test_peer_scus_against_our_tms(tmp_path):
    """Find, claim, modify, subscribe (globally and to one UPS, UPS Push on UPS Watch),
    request cancel, cancel, N-CREATE, and every event naming UPS Push (CC.2.4.3)."""
    with EventReceiver("PEERWATCH") as watcher, EventReceiver("PEERDEV") as performer:
        site = _tms_process(
            tmp_path,
            f"PEERWATCH@{HOST}:{watcher.port}",
            f"PEERDEV@{HOST}:{performer.port}",
            extra=("--seed", "LINAC1", "--allow", "PEEROP", "--allow", "PEERSCHED"),
        )
        try:
            host, port = site.addresses["TMS"]
            with UpsScu(host, port, "TMS", "PEERWATCH") as scu:
                subscribed = scu.subscribe("global", "PEERWATCH", deletion_lock=False)
            assert subscribed.status == 0x0000, subscribed
            assert subscribed.sop_class_uid == FINAL.push
            with UpsScu(host, port, "TMS", "PEERDEV") as device:
                query = worklist_query(station="LINAC1")
                query.SOPClassUID = ""
                found = device.find(query)
                assert found.status == 0x0000 and len(found.matches) == 4, found
                assert {str(m.SOPClassUID) for m in found.matches} == {FINAL.push}
                uid = str(found.matches[-1].SOPInstanceUID)
                claimed, transaction = device.claim(uid)
                assert claimed.status == 0x0000, claimed
                assert device.subscribe(uid, "PEERDEV").status == 0x0000
                for percent in (10.0, 30.0):
                    assert device.set(uid, progress_update(percent), transaction).ok
                # One attribute asked: a pynetdicom SCP's own logging once hung on it.
                got = device.get(uid, [Tag("ProcedureStepState")])
                assert got.status == 0x0000 and got.dataset.ProcedureStepState == "IN PROGRESS"
                with UpsScu(host, port, "TMS", "PEEROP") as operator:
                    asked = operator.request_cancel(uid, reason="patient unwell")
                assert asked.status == 0x0000, asked
                assert asked.sop_class_uid == FINAL.push
                heard = performer.wait_for(
                    lambda e: (
                        e.event_type_id == EventType.CANCEL_REQUESTED
                        and e.affected_sop_instance_uid == uid
                    ),
                    10,
                )
                assert heard is not None and heard.event_information.RequestingAE == "PEEROP"
                assert device.set(uid, cancellation_attributes(), transaction).ok
                ended = device.change_state(uid, "CANCELED", transaction)
                assert ended.status == 0x0000, ended
            # An N-CREATE with a station: the global subscriber hears SCHEDULED and its
            # assignment (PS3.4 CC.2.4.3, UPS Assigned).
            with UpsScu(host, port, "TMS", "PEERSCHED") as scheduler:
                new_uid = "1.2.826.0.1.3680043.8.498.77000000000000000000000000001"
                attributes = _with_type_2(ups_attributes(station=("LINAC9", "99TMS", "Linac 9")))
                made = scheduler.create(new_uid, attributes)
                assert made.status == 0x0000, made

            def seen(kind: int, ups: str, state: str = "") -> bool:
                return (
                    watcher.wait_for(
                        lambda e: (
                            e.event_type_id == kind
                            and e.affected_sop_instance_uid == ups
                            and (
                                not state or e.event_information.get("ProcedureStepState") == state
                            )
                        ),
                        10,
                    )
                    is not None
                )

            assert seen(EventType.STATE_REPORT, uid, "IN PROGRESS")
            assert seen(EventType.PROGRESS_REPORT, uid)
            assert seen(EventType.CANCEL_REQUESTED, uid)
            assert seen(EventType.STATE_REPORT, uid, "CANCELED")
            assert seen(EventType.STATE_REPORT, new_uid, "SCHEDULED")
            assert seen(EventType.ASSIGNED, new_uid)
            assigned = watcher.events_for(new_uid, EventType.ASSIGNED)[0].event_information
            assert assigned.ScheduledStationNameCodeSequence[0].CodeValue == "LINAC9"
            with UpsScu(host, port, "TMS", "PEERWATCH") as scu:
                assert scu.unsubscribe("global", "PEERWATCH").status == 0x0000
        finally:
            site.stop()
        events = watcher.events + performer.events
    assert events and {e.affected_sop_class_uid for e in events} == {FINAL.push}
    assert {e.context_uid for e in events} == {FINAL.event}
    # A global subscription without a deletion lock gets no initial State Report of the UPS
    # that already existed (Table CC.2.3-2): the first event of each is its claim's.
    first = next(e for e in watcher.events if e.affected_sop_instance_uid == uid)
    assert first.event_information.ProcedureStepState == "IN PROGRESS"


def test_the_kit_as_written_creates_its_ups_on_our_tms(tmp_path, capsys):
    """docs/conformance.md: each schedule/ file is an N-CREATE data set; its UID goes in the
    command. Sent so by an SCU that is not ours, our TMS takes every one of them."""
    kit, manifest = _kit(tmp_path, "TMS")
    capsys.readouterr()
    site = _tms_process(tmp_path, extra=("--allow", "PEERSCHED"))
    try:
        host, port = site.addresses["TMS"]
        entries = [e for s in manifest["stations"] for x in s["sessions"] for e in x["ups"]]
        with UpsScu(host, port, "TMS", "PEERSCHED") as scheduler:
            statuses = [
                scheduler.create(
                    e["sop_instance_uid"], Dataset.from_json((kit / e["file"]).read_text())
                ).status
                for e in entries
            ]
    finally:
        site.stop()
    assert statuses == [0x0000] * len(entries), statuses


def test_our_watch_against_the_peer_scp(tmp_path):
    """``tdw-emu watch`` subscribes the standard's way (UPS Push on the UPS Watch context)
    and prints what a TMS written from PS3.4 sends it."""
    watch_port = free_port()
    with UpsScp(ae_title=PEER_TMS, destinations={"TDWWATCH": (HOST, watch_port)}) as scp:
        watch = subprocess.Popen(
            [
                sys.executable, "-m", "emulator.cli", "watch",
                "--tms", f"{PEER_TMS}@{HOST}:{scp.port}",
                "--listen", f"TDWWATCH@{HOST}:{watch_port}", "--json", "--timeout", "60",
                "--until", "event=ups_state_report,state=COMPLETED",
            ],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            said = watch.stderr.readline()
            assert "subscribed" in said, said + watch.stderr.read()
            with UpsScu(HOST, scp.port, PEER_TMS, "PEERSCHED") as scu:
                uid = "1.2.826.0.1.3680043.8.498.77000000000000000000000000002"
                assert scu.create(uid, ups_attributes()).status == 0x0000
                claimed, transaction = scu.claim(uid)
                assert claimed.ok
                assert scu.set(uid, completion_attributes(), transaction).ok
                assert scu.change_state(uid, "COMPLETED", transaction).ok
            watch.wait(timeout=60)
            out = watch.stdout.read()
        finally:
            watch.kill()
        subscriptions = [
            r for r in scp.requests if r.kind == "N-ACTION" and r.action_type in (3, 4)
        ]
        violations = list(scp.violations)
    assert watch.returncode == 0, out + watch.stderr.read()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["state"] for r in rows if r["event"] == "ups_state_report"][-1] == "COMPLETED"
    assert not [r for r in rows if r.get("problems")], rows
    assert [r.instance_uid for r in subscriptions][:1] == [GLOBAL_SUBSCRIPTION]
    assert {r.sop_class_uid for r in subscriptions} == {FINAL.push}
    assert {r.context_uid for r in subscriptions} == {FINAL.watch}
    assert violations == [], violations


def test_a_refused_presentation_context_is_named(tmp_path):
    """A peer that accepts the association but not the Study Root MOVE context is named for
    that, not taken for one that hung up (it said 'if it requires TLS ...' before)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from emulator.net import scu
    from emulator.net.peers import Peer
    from emulator.net.scu import ContextsRefused

    ae = AE(ae_title="ECHOONLY")
    ae.add_supported_context(Verification)
    server = ae.start_server((HOST, 0), block=False)
    try:
        peer = Peer("ECHOONLY", HOST, server.server_address[1])
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = "1.2.3"
        try:
            scu.move("PDS1", peer, identifier, "PDS1")
        except ContextsRefused as exc:
            said = str(exc)
        else:
            raise AssertionError("the move was not refused")
    finally:
        server.shutdown()
    assert "refused the presentation context" in said, said
    assert "MOVE" in said and "abstract syntax not supported" in said, said
    assert "TLS" not in said
