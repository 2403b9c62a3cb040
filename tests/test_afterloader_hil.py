"""An HDR fraction through `tdw-emu hil controller-sim --machine afterloader`, as a bench rig
runs one: the controller in its own process on a socat pty pair and on TCP, `tdw-emu tms`
and `tdw-emu run --kind afterloader` in theirs. The door opens 2 s of source time into
channel 2 (the controller's fault channel): the session is CANCELED with the record of
each dwell the controller measured, and the continuation gives exactly the rest, so both
records together are the plan, decay-corrected to each session's date.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from emulator.brachy_fraction import recorded_source, treated_at
from emulator.reference.ups_store import UpsStore
from emulator.results.brachy_record import delivered_channel_times
from emulator.store.object_store import ObjectStore
from emulator.synth.brachy_access import planned_channels, planned_source
from hil.faults import send_fault
from tests.conftest import REPO, dciodvfy_errors, free_port, start_cli_process
from tests.hil_bench import controller_process, socat_pair


@pytest.mark.timeout(400)
@pytest.mark.parametrize("link", ["pty", "tcp"])
def test_an_hdr_fraction_with_a_door_interlock_through_the_controller(link, tmp_path):
    socat = None
    if link == "pty":
        socat, host_end, controller_end = socat_pair(tmp_path)
        where = ("--serial", str(controller_end))
    else:
        host_end, where = None, ("--tcp", "127.0.0.1:0")
    controller, device = controller_process(
        "--machine", "afterloader", "--time-scale", "0.1", *where, host_end=host_end
    )
    control = device.rsplit("control=", 1)[1].rsplit(":", 1)
    assert send_fault((control[0], int(control[1])), {"fault": "door", "channel": 2, "seconds": 2})[
        "ok"
    ]
    port = free_port()
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0", "--archive-port", "0",
        "--peer", f"AL1@127.0.0.1:{port}",
        "--seed-afterloader", "HDR1", "--seed-size", "small",
        ready="ready",
    )  # fmt: skip
    report = tmp_path / "report"
    try:
        tms_host, tms_port = site.addresses["TMS"]
        archive_host, archive_port = site.addresses["ARCHIVE"]
        result = subprocess.run(
            [
                sys.executable, "-m", "emulator.cli", "run",
                "--kind", "afterloader", "--station", "HDR1", "--ae-title", "AL1",
                "--tms", f"TMS@{tms_host}:{tms_port}",
                "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
                "--listen-port", str(port), "--data-dir", str(tmp_path / "device"),
                "--device", device, "--time-scale", "0.1",
                "--sessions", "2", "--wait", "5", "--report-dir", str(report),
            ],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        site.stop()
        controller.stop()
        if socat is not None:
            socat.terminate()
            socat.wait(timeout=10)
    outcomes = json.loads((report / "run-report.json").read_text())["outcomes"]
    assert [(o["state"], o["delivery_type"]) for o in outcomes] == [
        ("CANCELED", "TREATMENT"),
        ("COMPLETED", "CONTINUATION"),
    ], result.stdout + result.stderr
    assert "(DOOR)" in outcomes[0]["reason"]
    workitems = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3").select()
    assert [w.state for w in workitems] == ["CANCELED", "COMPLETED"]

    store = ObjectStore(tmp_path / "site" / "archive")
    records = sorted(
        (store.read(i) for i in store if i.values["modality"] == "RTRECORD"),
        key=lambda r: (str(r.TreatmentDate), str(r.TreatmentTime)),
    )
    (plan,) = [store.read(i) for i in store if i.values["modality"] == "RTPLAN"]
    store.close()
    assert len(records) == 2
    # What the controller measured, channel by channel, is what each record holds.
    for outcome, record in zip(outcomes, records, strict=True):
        measured = {int(c): s for c, s in outcome["delivered"].items()}
        assert delivered_channel_times(record) == pytest.approx(measured, abs=0.1)
    assert delivered_channel_times(records[0])[2] == pytest.approx(2.0, abs=0.1)
    reference = planned_source(plan).reference_air_kerma_rate
    given: dict[int, float] = {}
    for record in records:
        factor = recorded_source(record).strength_at(treated_at(record)) / reference
        for channel, seconds in delivered_channel_times(record).items():
            given[channel] = given.get(channel, 0.0) + seconds * factor
    for channel in planned_channels(plan):
        assert given[channel.channel_number] == pytest.approx(channel.total_time_s, abs=0.1)
    for number, record in enumerate(records):
        path = tmp_path / f"record{number}.dcm"
        record.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
