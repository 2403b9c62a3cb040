"""A whole PDS session at time scale 1, as a bench rig runs it: the simulated linac's 60 s
CBCT and real gantry and beam times, against `tdw-emu tms` in its own process.

The reference TMS drops an association idle for 30 s (its ACSE/network timeouts); a device
that held one through the CBCT failed here before. Every UPS must end COMPLETED.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from emulator.reference.ups_store import UpsStore
from tests.conftest import REPO, free_port
from tests.kill_harness import run_command, start_site

CBCT_SECONDS = 60.0  # profiles/machines/linac.yaml: one gantry rotation


@pytest.mark.timeout(900)
def test_a_whole_pds_session_at_real_time(tmp_path):
    port = free_port()
    site = start_site(tmp_path / "site", port, 1)
    report_dir = tmp_path / "report"
    try:
        started = time.monotonic()
        result = subprocess.run(
            run_command(
                site, port, tmp_path / "device",
                "--time-scale", "1", "--report-dir", str(report_dir),
            ),
            cwd=REPO, capture_output=True, text=True, timeout=800,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        site.stop()
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
    events = [json.loads(line) for line in (report_dir / "dimse-traffic.jsonl").open()]
    ends = [e for e in events if e.get("event") in ("A-RELEASE", "A-ABORT")]
    assert ends and all(e["event"] == "A-RELEASE" for e in ends), ends
