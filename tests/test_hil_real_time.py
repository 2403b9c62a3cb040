"""A bench rig at real speed: `tdw-emu hil controller-sim --time-scale 1` on a socat pty pair
and on TCP, `tdw-emu tms` and `tdw-emu run --device ...` as separate processes, a whole PDS
session. The CBCT takes 60 s, so a host that gave any request a fixed 10 s would fail; the
host waits as the controller's timing budget and its PROGRESS frames say."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from emulator.reference.ups_store import UpsStore
from tests.conftest import REPO, free_port, require_tool, start_cli_process
from tests.kill_harness import run_command, start_site

LONGEST_OPERATION_S = 30.0  # the CBCT alone is 60 s on profiles/machines/linac.yaml


def _socat_pair(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    socat = require_tool("/usr/bin/socat")
    host_end, controller_end = tmp_path / "host-tty", tmp_path / "controller-tty"
    process = subprocess.Popen(
        [
            socat, "-d", "-d",
            f"pty,raw,echo=0,link={host_end}", f"pty,raw,echo=0,link={controller_end}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (host_end.exists() and controller_end.exists()):
        assert time.monotonic() < deadline, "socat made no pty pair"
        time.sleep(0.05)
    return process, host_end, controller_end


# A whole PDS session against the controller at real speed takes 2.7 minutes of a 2-core
# machine's 20-minute make test; make test's real-time session is tests/test_real_time.py,
# and these run with TDW_REAL_TIME=all (tests/conftest.py leaves this file out otherwise).
# At scaled time both links are covered by tests/test_hil.py and tests/test_fault_matrix.py.
LINKS = ["pty", "tcp"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("link", LINKS)
def test_a_whole_pds_session_at_real_speed_on_a_controller(tmp_path, link):
    socat = None
    if link == "pty":
        socat, host_end, controller_end = _socat_pair(tmp_path)
        where = ("--serial", str(controller_end))
    else:
        where = ("--tcp", "127.0.0.1:0")
    controller = start_cli_process(
        "hil controller-sim", *where, "--time-scale", "1", ready="controller listening on"
    )
    port = free_port()
    site = start_site(tmp_path / "site", port, 1)
    try:
        if link == "pty":
            device = f"serial://{host_end}"
        else:
            printed = next(line for line in controller.output if "listening on tcp://" in line)
            device = re.search(r"(tcp://\S+)", printed)[1]
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
