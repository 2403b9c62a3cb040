"""kill -9 of `tdw-emu run --kind afterloader` while the source is out, then the same
command again: the restarted device must end the UPS it left IN PROGRESS, CANCELED with an
RT Brachy Treatment Record of the dwells its journal holds.

The simulated afterloader lives in the killed process, so no machine confirms the count
after the kill: the channel it stopped in ends UNKNOWN, and the reference TMS schedules no
continuation from an unconfirmed count (it notes that the session needs review), as it does
for a linac's beam. A physicist decides from the machine's own log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from emulator.brachy_fraction import remaining_reference_s
from emulator.reference.ups_store import UpsStore
from emulator.results.brachy_record import delivered_channel_times
from emulator.store.object_store import ObjectStore
from tests.conftest import REPO, dciodvfy_errors, free_port, start_cli_process
from tests.kill_harness import cancel_reason


def _run(site, port: int, data_dir, *extra: str) -> list[str]:
    tms_host, tms_port = site.addresses["TMS"]
    archive_host, archive_port = site.addresses["ARCHIVE"]
    return [
        sys.executable, "-m", "emulator.cli", "run",
        "--kind", "afterloader", "--station", "HDR1", "--ae-title", "AL1",
        "--tms", f"TMS@{tms_host}:{tms_port}",
        "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
        "--listen-port", str(port), "--data-dir", str(data_dir), *extra,
    ]  # fmt: skip


@pytest.mark.timeout(300)
def test_a_device_killed_while_the_source_is_out_records_what_it_journaled(tmp_path):
    port = free_port()
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0", "--archive-port", "0",
        "--peer", f"AL1@127.0.0.1:{port}",
        "--seed-afterloader", "HDR1", "--seed-size", "small",
        ready="ready",
    )  # fmt: skip
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    try:
        device = tmp_path / "device"
        process = subprocess.Popen(
            _run(site, port, device, "--time-scale", "1"),
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            w.state == "IN PROGRESS" for w in ups.select()
        ):
            time.sleep(0.1)
        # 4 s of check run, 1.5 s of transfer, then the source dwells in channel 1.
        time.sleep(8.0)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert [w.state for w in ups.select()] == ["IN PROGRESS"]
        again = subprocess.run(
            _run(site, port, device, "--sessions", "all", "--wait", "3"),
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert again.returncode in (0, 1), again.stdout + again.stderr
    finally:
        site.stop()
    workitems = ups.select()
    (workitem,) = workitems
    assert workitem.state == "CANCELED"
    assert "restarted while treating" in cancel_reason(workitem)
    notes = [session.note for session in ups.sessions()]
    assert notes == ["continuation needs review: a channel ended UNKNOWN"]

    store = ObjectStore(tmp_path / "site" / "archive")
    (record,) = [store.read(i) for i in store if i.values["modality"] == "RTRECORD"]
    (plan,) = [store.read(i) for i in store if i.values["modality"] == "RTPLAN"]
    store.close()
    killed = delivered_channel_times(record)
    assert set(killed) == {1} and killed[1] > 0  # stopped inside channel 1
    setup = record.TreatmentSessionApplicationSetupSequence[0]
    assert setup.TreatmentTerminationStatus == "UNKNOWN"
    left = remaining_reference_s(plan, [record])
    assert sum(left[1]) > 0 and all(s > 0 for s in left[2])  # never more than was given
    path = tmp_path / "record.dcm"
    record.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
