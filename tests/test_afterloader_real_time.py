"""An HDR fraction at time scale 1, as a user runs it: `tdw-emu tms` seeds a brachytherapy
patient for an afterloader station in its own process, and `tdw-emu run --kind
afterloader` claims the delivery UPS, checks the plan against the machine, treats channel
by channel in real seconds (check runs, transfers and dwells) and stores an RT Brachy
Treatment Record. The record must be dciodvfy-clean, and its channel times what the
machine measured (the run's report, from the machine's dwell events) to 0.1 s.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
import time

import pytest

from devices.sim.brachy_source import loaded_source
from devices.sim.linac import load_machine_profile
from emulator.reference.ups_store import UpsStore
from emulator.results.brachy_record import delivered_channel_times
from emulator.store.object_store import ObjectStore
from emulator.synth.brachy_access import planned_channels, planned_source
from tests.conftest import REPO, dciodvfy_errors, free_port, start_cli_process


@pytest.mark.timeout(300)
def test_an_hdr_fraction_at_real_time_against_a_tms_process(tmp_path):
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
        started = time.monotonic()
        result = subprocess.run(
            [
                sys.executable, "-m", "emulator.cli", "run",
                "--kind", "afterloader", "--station", "HDR1", "--ae-title", "AL1",
                "--tms", f"TMS@{tms_host}:{tms_port}",
                "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
                "--listen-port", str(port), "--data-dir", str(tmp_path / "device"),
                "--time-scale", "1", "--report-dir", str(report),
            ],
            cwd=REPO, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        site.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    (outcome,) = json.loads((report / "run-report.json").read_text())["outcomes"]
    assert outcome["state"] == "COMPLETED" and outcome["step"] == "delivery"
    measured = {int(c): s for c, s in outcome["delivered"].items()}

    store = ObjectStore(tmp_path / "site" / "archive")
    (record,) = [store.read(i) for i in store if i.values["modality"] == "RTRECORD"]
    (plan,) = [store.read(i) for i in store if i.values["modality"] == "RTPLAN"]
    store.close()
    path = tmp_path / "record.dcm"
    record.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    recorded = delivered_channel_times(record)
    assert recorded == pytest.approx(measured, abs=0.1)
    # At time scale 1 the machine times each dwell by its own clock: the seconds the plan
    # asks of today's source (a decayed source dwells longer).
    source = loaded_source(load_machine_profile("afterloader"), dt.datetime.now())
    factor = planned_source(plan).reference_air_kerma_rate / source.strength_at(dt.datetime.now())
    for channel in planned_channels(plan):
        assert recorded[channel.channel_number] == pytest.approx(
            channel.total_time_s * factor, abs=0.1
        )
    # Real time: every second of source time, each channel's 4 s check run and 3 s of
    # transfers, passed on the wall clock.
    assert took >= sum(recorded.values()) + 7 * len(recorded)

    workitems = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3").select()
    assert [w.state for w in workitems] == ["COMPLETED"]

    # RO-26 as sent: the delivered share of the session's source time, 0 as the first
    # channel starts, more as the second starts, rising, 100 at the end.
    traffic = [json.loads(line) for line in (report / "dimse-traffic.jsonl").open()]
    values = [
        float(m["summary"]["ProcedureStepProgress"])
        for m in traffic
        if m.get("message") == "N-SET-RQ"
        and m["sop_instance_uid"] == outcome["sop_instance_uid"]
        and "ProcedureStepProgress" in m.get("summary", {})
    ]
    assert values[0] == 0 and values[-1] == 100, values
    assert all(b >= a for a, b in itertools.pairwise(values)), values
    share = recorded[1] / sum(recorded.values()) * 100
    assert any(abs(v - share) < 1.0 for v in values), (values, share)  # channel 2 starts
