"""A whole PDS session at time scale 1, as a bench rig runs it: `tdw-emu hil controller-sim`
on a socat pty pair, its 60 s CBCT and real gantry and beam times, `tdw-emu tms` and
`tdw-emu run` each in its own process, and a patient who is not the bench phantom (an
8-slice 64 x 64 CT): the simulator images the patient through its control channel.

The reference TMS drops an association idle for 30 s (its ACSE/network timeouts); a device
that held one through the CBCT failed here before. Every UPS must end COMPLETED.

The delivery's RO-26 progress must tell the truth at real speed: the share of the
fraction's meterset delivered, above 0 when beam 2 starts, rising from beam to beam and
within beams, 100 at the end (it stayed 0 until the end before); an independent UPS Event
receiver (tests/peers), subscribed globally the standard's way, hears the TMS's Progress
Reports of it, and every event names UPS Push.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest

from emulator.reference.ups_store import UpsStore
from tests.conftest import REPO, free_port
from tests.hil_bench import controller_process, socat_pair
from tests.kill_harness import run_command, start_site
from tests.peers.event_receiver import EventReceiver
from tests.peers.ups_scu import UpsScu
from tests.peers.ups_uids import FINAL, EventType

CBCT_SECONDS = 60.0  # profiles/machines/linac.yaml: one gantry rotation


def report_uids(report_dir: Path) -> list[str]:
    """The UPS the run report names, in order ([] before it is written)."""
    path = report_dir / "run-report.json"
    if not path.exists():
        return [""]
    return [o["sop_instance_uid"] for o in json.loads(path.read_text())["outcomes"]]


@pytest.mark.timeout(900)
def test_a_whole_pds_session_at_real_time(tmp_path):
    port = free_port()
    socat, host_end, controller_end = socat_pair(tmp_path)
    controller, device = controller_process(
        "--serial", str(controller_end), "--time-scale", "1", host_end=host_end
    )
    with EventReceiver("PEERWATCH") as watcher:
        site = start_site(
            tmp_path / "site", port, 1, "--seed-size", "small",
            "--peer", f"PEERWATCH@127.0.0.1:{watcher.port}",
        )  # fmt: skip
        report_dir = tmp_path / "report"
        try:
            tms_host, tms_port = site.addresses["TMS"]
            with UpsScu(tms_host, tms_port, "TMS", "PEERWATCH") as scu:
                assert scu.subscribe("global", "PEERWATCH").status == 0x0000
            started = time.monotonic()
            result = subprocess.run(
                run_command(
                    site, port, tmp_path / "device",
                    "--device", device, "--report-dir", str(report_dir),
                ),
                cwd=REPO, capture_output=True, text=True, timeout=800,
            )  # fmt: skip
            took = time.monotonic() - started
            watcher.wait_for(
                lambda e: (
                    e.event_type_id == EventType.STATE_REPORT
                    and e.event_information.get("ProcedureStepState") == "COMPLETED"
                    and e.affected_sop_instance_uid == report_uids(report_dir)[-1]
                ),
                30,
            )
        finally:
            site.stop()
            controller.stop()
            socat.terminate()
            socat.wait(timeout=10)
        events = watcher.events
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((report_dir / "run-report.json").read_text())
    assert [(o["step"], o["state"]) for o in report["outcomes"]] == [
        ("acquisition", "COMPLETED"),
        ("registration", "COMPLETED"),
        ("adjustment", "COMPLETED"),
        ("delivery", "COMPLETED"),
    ]
    assert took > CBCT_SECONDS, f"{took:.0f} s: not real time"
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    try:
        assert [r.state for r in ups.select()] == ["COMPLETED"] * 4
    finally:
        ups.close()
    # No association outlived an exchange: each one the device opened to the TMS was
    # released, none was aborted by the TMS's idle timeout.
    traffic = [json.loads(line) for line in (report_dir / "dimse-traffic.jsonl").open()]
    ends = [e for e in traffic if e.get("event") in ("A-RELEASE", "A-ABORT")]
    assert ends and all(e["event"] == "A-RELEASE" for e in ends), ends

    # RO-26 of the delivery, as sent: beam starts carry the beam number in progress.
    delivery = report["outcomes"][-1]["sop_instance_uid"]
    progress = [
        (
            float(m["summary"]["ProcedureStepProgress"]),
            m["summary"].get("PerformedProcessingParameters"),
        )
        for m in traffic
        if m.get("message") == "N-SET-RQ"
        and m["sop_instance_uid"] == delivery
        and "ProcedureStepProgress" in m.get("summary", {})
    ]
    values = [value for value, _ in progress]
    starts = [value for value, beam in progress if beam]
    assert len(starts) == 4, progress  # one report as each of the four beams starts
    assert starts[0] == 0 and starts[1] > 0, progress
    assert all(b > a for a, b in itertools.pairwise(starts)), progress  # beam to beam
    assert all(b >= a for a, b in itertools.pairwise(values)), progress  # never falls
    assert values[-1] == 100, progress
    assert len(set(values)) > len(starts) + 1, f"no report in the middle of a beam: {progress}"

    # The TMS's UPS Progress Reports of them, to an independent subscriber, naming UPS Push.
    reported = [
        float(e.event_information.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress)
        for e in events
        if e.event_type_id == EventType.PROGRESS_REPORT and e.affected_sop_instance_uid == delivery
    ]
    # One Progress Report per change of the progress (a beam start at the share the last
    # report of the beam before already gave changes nothing).
    changes = [v for i, v in enumerate(values) if 0 < v < 100 and (i == 0 or v != values[i - 1])]
    assert changes == [v for v in reported if 0 < v < 100], (values, reported)
    assert {e.affected_sop_class_uid for e in events} == {FINAL.push}
    for uid in report_uids(report_dir):
        states = [
            e.event_information.ProcedureStepState
            for e in events
            if e.event_type_id == EventType.STATE_REPORT and e.affected_sop_instance_uid == uid
        ]
        assert states == ["IN PROGRESS", "COMPLETED"], (uid, states)
    # The device subscribed to each UPS it claimed naming UPS Push, on the Watch context.
    subscriptions = [
        m for m in traffic if m.get("message") == "N-ACTION-RQ" and m["action_type"] == 3
    ]
    assert len(subscriptions) == 4, subscriptions
    assert {(m["sop_class_uid"], m["context_uid"]) for m in subscriptions} == {
        (FINAL.push, FINAL.watch)
    }
