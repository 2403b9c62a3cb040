"""Ctrl-C, SIGTERM and kill -9 of `tdw-emu run` as a user does them: the README's command,
no --data-dir, `tdw-emu tms` in its own process, a beam on.

The first SIGINT holds the beam as an operator hold does: the record of what the machine
measured is stored, the delivery UPS is CANCELED with a CID 9300 code, and the command
exits 130 with one sentence. After a SIGKILL the same command (same AE title and station,
so the same journal in the user's state directory) ends the UPS the killed process left IN
PROGRESS. Nothing is ever left IN PROGRESS at the TMS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.reference.ups_store import UpsStore
from emulator.store.object_store import ObjectStore
from tests.conftest import REPO, free_port, start_cli_process
from tests.kill_harness import cancel_reason


def _site(tmp_path: Path, port: int):
    return _site_with(tmp_path, port)


def _site_with(tmp_path: Path, port: int, *extra: str):
    return start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0", "--archive-port", "0",
        "--peer", f"PDS1@127.0.0.1:{port}",
        "--seed", "LINAC1", "--seed-size", "small",
        *extra,
        ready="ready",
    )  # fmt: skip


def _run(site, port: int, *extra: str) -> list[str]:
    """The README's device command: no --data-dir."""
    tms_host, tms_port = site.addresses["TMS"]
    archive_host, archive_port = site.addresses["ARCHIVE"]
    return [
        sys.executable, "-m", "emulator.cli", "run",
        "--kind", "pds", "--station", "LINAC1",
        "--tms", f"TMS@{tms_host}:{tms_port}",
        "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
        "--listen-port", str(port), *extra,
    ]  # fmt: skip


def _wait_for_delivery(ups: UpsStore, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not any(w.step == "delivery" and w.state == "IN PROGRESS" for w in ups.select()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the delivery never started"
        time.sleep(0.1)


def _code(workitem) -> str:
    item = workitem.dataset.ProcedureStepProgressInformationSequence[0]
    return str(item.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue)


def _delivered(site_dir: Path) -> float:
    """MU a beam record holds, or source seconds a brachy record holds."""
    from emulator.soak.verdict import recorded_amounts

    store = ObjectStore(site_dir / "archive")
    try:
        records = [store.read(i) for i in store if i.values["modality"] == "RTRECORD"]
    finally:
        store.close()
    return sum(sum(recorded_amounts(record).values()) for record in records)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("signum", "kind"), [(signal.SIGINT, "pds"), (signal.SIGTERM, "afterloader")]
)
def test_a_signal_during_a_beam_cancels_the_ups_with_the_measured_record(signum, kind, tmp_path):
    """SIGINT with a linac's beam on, SIGTERM with an afterloader's source out."""
    port = free_port()
    seed = ("--seed", "LINAC1") if kind == "pds" else ("--seed-afterloader", "HDR1")
    ae, station = ("PDS1", "LINAC1") if kind == "pds" else ("AL1", "HDR1")
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0", "--archive-port", "0",
        "--peer", f"{ae}@127.0.0.1:{port}", *seed, "--seed-size", "small",
        ready="ready",
    )  # fmt: skip
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    tms_host, tms_port = site.addresses["TMS"]
    archive_host, archive_port = site.addresses["ARCHIVE"]
    try:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "emulator.cli", "run", "--kind", kind,
                "--station", station, "--ae-title", ae,
                "--tms", f"TMS@{tms_host}:{tms_port}",
                "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
                "--listen-port", str(port), "--time-scale", "0.3",
            ],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_delivery(ups, process)
        # A linac's beam 1 is on (100 MU at 600 MU/min: 3 s at time scale 0.3); an
        # afterloader's source is out after its check run and transfer (1.7 s).
        time.sleep(1.5 if kind == "pds" else 2.5)
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:
        site.stop()
    name = signal.Signals(signum).name
    assert process.returncode == 130, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {name}: 1 UPS canceled as an operator hold"), err
    assert last.endswith("nothing left IN PROGRESS"), err
    assert "Traceback" not in err
    workitems = ups.select()
    assert not [w for w in workitems if w.state == "IN PROGRESS"]
    (delivery,) = [w for w in workitems if w.step == "delivery" and w.state == "CANCELED"]
    assert _code(delivery) == "110513"  # CID 9300: discontinued (the operator's hold)
    assert f"({name})" in cancel_reason(delivery)
    given = _delivered(tmp_path / "site")
    assert 0 < given < (400 if kind == "pds" else 20)  # what was measured, not the plan


@pytest.mark.timeout(300)
def test_the_same_command_after_a_kill_resumes_from_its_journal(tmp_path):
    port = free_port()
    site = _site(tmp_path, port)
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    try:
        process = subprocess.Popen(
            _run(site, port, "--time-scale", "0.3"),
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_delivery(ups, process)
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert any(w.state == "IN PROGRESS" for w in ups.select())
        again = subprocess.run(
            _run(site, port, "--sessions", "all", "--wait", "3"),
            cwd=REPO, env=env, capture_output=True, text=True, timeout=200,
        )  # fmt: skip
    finally:
        site.stop()
    journal = tmp_path / "state" / "tdw-emulator" / "devices" / "PDS1-LINAC1"
    assert f"device journal in {journal} (1 UPS claimed by an earlier run" in again.stdout
    workitems = ups.select()
    assert not [w for w in workitems if w.state in ("IN PROGRESS", "SCHEDULED")], [
        (w.step, w.state) for w in workitems
    ]
    killed = [w for w in workitems if "restarted" in cancel_reason(w)]
    assert len(killed) == 1 and killed[0].step == "delivery"


@pytest.mark.timeout(400)
def test_sigint_during_scenarios_run_writes_the_reports_and_leaves_nothing_in_progress(tmp_path):
    """A cancelled CI job: SIGINT while the suite performs the interruption scenario's long
    beam. The suite stops at once, ends what it claimed at the TMS under test, and writes
    its reports (the scenario it was in not judged)."""
    devices = [f"TDWEMU{n}@127.0.0.1:{free_port()}" for n in (1, 2)]
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0", "--archive-port", "0",
        *(a for d in devices for a in ("--peer", d)),
        "--seed-scenarios",
        ready="ready",
        timeout=300,
    )  # fmt: skip
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    report = tmp_path / "report"
    try:
        tms, archive = site.addresses["TMS"], site.addresses["ARCHIVE"]
        process = subprocess.Popen(
            [
                sys.executable, "-m", "emulator.cli", "scenarios", "run",
                "--tms", f"TMS@{tms[0]}:{tms[1]}",
                "--archive", f"ARCHIVE@{archive[0]}:{archive[1]}",
                *(a for d in devices for a in ("--device", d)),
                "--only", "normal-fraction", "--only", "long-beam-while-querying",
                "--report-dir", str(report),
            ],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 200
        while not any(w.state == "IN PROGRESS" for w in ups.select() if w.step == "delivery"):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no delivery began"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=200)
    finally:
        site.stop()
    assert process.returncode == 130, out + err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGINT: "), err
    assert "Traceback" not in err
    for name in ("conformance.json", "conformance-junit.xml", "conformance.html"):
        assert (report / name).is_file(), name
    assert not [w for w in ups.select() if w.state == "IN PROGRESS"]


@pytest.mark.timeout(400)
def test_sigint_during_a_soak_ends_every_session_and_every_worker_reports(tmp_path):
    verdict_file = tmp_path / "verdict.json"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "emulator.cli", "soak", "--embedded",
            "--devices", "3", "--mix", "pds=1,afterloader=1", "--duration", "300",
            "--time-scale", "0.3", "--workers", "2", "--json", str(verdict_file),
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(20)  # every device in a session: CBCTs, beams, channels
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT: every device ended the session"), err
    assert last.endswith("nothing left IN PROGRESS"), err
    assert "without a verdict" not in err
    verdict = json.loads(verdict_file.read_text())
    assert verdict["tms"].get("in_progress", 0) == 0 and verdict["tms"]
    assert verdict["records"]["lost_records"] == 0


@pytest.mark.timeout(300)
def test_an_operator_ends_a_ups_whose_performer_is_gone(tmp_path):
    """A performer claims the delivery and is never heard of again: `tdw-emu tms cancel`
    alone leaves the UPS IN PROGRESS for good (nobody can answer); with --force the TMS,
    told by its operator that the performer is gone, ends it CANCELED itself (PS3.4
    CC.2.1.3) with a coded reason, and its subscribers hear the State Report."""
    from pydicom.uid import generate_uid

    from tests.peers.event_receiver import EventReceiver
    from tests.peers.ups_scu import UpsScu
    from tests.peers.ups_uids import EventType

    port = free_port()
    with EventReceiver("PEERWATCH") as watcher:
        site = _site_with(tmp_path, port, "--allow", "OPERATOR",
                          "--peer", f"PEERWATCH@127.0.0.1:{watcher.port}")  # fmt: skip
        ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
        try:
            tms_host, tms_port = site.addresses["TMS"]
            (stuck,) = [w for w in ups.select() if w.step == "delivery"]
            with UpsScu(tms_host, tms_port, "TMS", "PDS1") as performer:
                claim = performer.change_state(
                    stuck.sop_instance_uid, "IN PROGRESS", str(generate_uid())
                )
                assert claim.status == 0x0000
            with UpsScu(tms_host, tms_port, "TMS", "PEERWATCH") as scu:
                assert scu.subscribe("global", "PEERWATCH").status == 0x0000
            tms = f"TMS@{tms_host}:{tms_port}"
            forced = subprocess.run(
                [sys.executable, "-m", "emulator.cli", "tms", "cancel", stuck.sop_instance_uid,
                 "--tms", tms, "--force", "--reason", "the delivery console crashed"],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert forced.returncode == 0, forced.stdout + forced.stderr
            assert "forced" in forced.stdout and "0x0000" in forced.stdout
            heard = watcher.wait_for(
                lambda e: (
                    e.event_type_id == EventType.STATE_REPORT
                    and e.affected_sop_instance_uid == stuck.sop_instance_uid
                    and e.event_information.get("ProcedureStepState") == "CANCELED"
                ),
                15,
            )
        finally:
            site.stop()
    assert heard is not None, "no State Report of the forced end"
    (ended,) = [w for w in ups.select() if w.sop_instance_uid == stuck.sop_instance_uid]
    assert ended.state == "CANCELED" and _code(ended) == "110501"
    assert "ended by OPERATOR: the delivery console crashed" in cancel_reason(ended)
    assert not [w for w in ups.select() if w.state == "IN PROGRESS"]
