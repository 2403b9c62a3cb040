"""A bench rig at real speed: `tdw-emu hil controller-sim --time-scale 1` on a socat pty pair
and on TCP, `tdw-emu tms` and `tdw-emu run --device ...` as separate processes, a whole PDS
session. The CBCT takes 60 s, so a host that gave any request a fixed 10 s would fail; the
host waits as the controller's timing budget and its PROGRESS frames say."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from emulator.reference.ups_store import UpsStore
from tests.conftest import REPO, free_port
from tests.hil_bench import controller_process, socat_pair
from tests.kill_harness import run_command, start_site

# A whole PDS session against the controller at real speed takes 2.7 minutes of a 2-core
# machine's 20-minute make test: make test runs the one on a socat pty, with a small patient
# (tests/test_real_time.py). These run with TDW_REAL_TIME=all (tests/conftest.py leaves this
# file out otherwise): TCP, and the pty again, with the standard 40-slice patient.
LINKS = ["pty", "tcp"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("link", LINKS)
def test_a_whole_pds_session_at_real_speed_on_a_controller(tmp_path, link):
    socat = None
    if link == "pty":
        socat, host_end, controller_end = socat_pair(tmp_path)
        controller, device = controller_process(
            "--serial", str(controller_end), "--time-scale", "1", host_end=host_end
        )
    else:
        controller, device = controller_process("--tcp", "127.0.0.1:0", "--time-scale", "1")
    port = free_port()
    site = start_site(tmp_path / "site", port, 1)
    try:
        report_dir = tmp_path / "report"
        started = time.monotonic()
        result = subprocess.run(
            run_command(
                site, port, tmp_path / "device",
                "--device", device, "--report-dir", str(report_dir),
            ),
            cwd=REPO, capture_output=True, text=True, timeout=800,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        site.stop()
        controller.stop()
        if socat is not None:
            socat.terminate()
            socat.wait(timeout=10)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((report_dir / "run-report.json").read_text())
    assert [o["state"] for o in report["outcomes"]] == ["COMPLETED"] * 4
    assert took > 60.0, f"{took:.0f} s is not real speed"
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    try:
        assert [r.state for r in ups.select()] == ["COMPLETED"] * 4
    finally:
        ups.close()
    # The treatment record names the controller's machine, as its HELLO_REPLY identified it.
    assert "Traceback" not in result.stderr
