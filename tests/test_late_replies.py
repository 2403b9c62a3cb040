"""A TMS that answers late (`tdw-emu tms --fault-hold-reply STATE=SECONDS`): the reply of
an accepted state change held past the device's DIMSE timeout, or past a kill.

A claim whose reply is lost is one the device may or may not hold. Under TDW-II it made the
Transaction UID and proves the claim its own with an N-SET carrying it; under RO-19 2008
the UID comes only in the lost reply, so the device says it cannot end the UPS. A CANCELED
the TMS took just before the device was killed is settled by the restarted device.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from emulator.reference.ups_store import UpsStore
from tests.conftest import REPO, free_port, wait_until
from tests.kill_harness import run_command, start_site


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def _records(site_dir: Path) -> list:
    ups = UpsStore(site_dir / "tms" / "ups.sqlite3")
    try:
        return ups.select()
    finally:
        ups.close()


def _deliveries(site_dir: Path) -> list:
    return [r for r in _records(site_dir) if r.step == "delivery"]


@pytest.mark.parametrize("profile", ["tdw-ii", "ihe-ro-2008"])
def test_a_claim_whose_reply_comes_too_late(tmp_path, profile):
    """Each claim's reply is held 6 s; the device waits 1.5 s, retries and is told C302."""
    port = free_port()
    site = start_site(
        tmp_path / "site", port, 1, "--profile", profile, "--fault-hold-reply", "in-progress=6"
    )
    report_dir = tmp_path / "report"
    try:
        run = run_command(
            site, port, tmp_path / "device",
            "--profile", profile, "--dimse-timeout", "1.5", "--report-dir", str(report_dir),
        )  # fmt: skip
        result = _run(run)
    finally:
        site.stop()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    states = [r.state for r in _records(tmp_path / "site")]
    report = json.loads((report_dir / "run-report.json").read_text())
    if profile == "tdw-ii":
        # Its own Transaction UID, sent with the claim, proves each lost claim was its own.
        assert result.returncode == 0, result.stdout + result.stderr
        assert states == ["COMPLETED"] * 4, states
        assert report["problems"] == []
    else:
        # The first claim landed; its UID was in the reply that never came. The device says
        # so and stops; the UPS is IN PROGRESS at the TMS, which must end it.
        assert result.returncode == 1, result.stdout + result.stderr
        assert sorted(states) == ["IN PROGRESS", "SCHEDULED", "SCHEDULED", "SCHEDULED"]
        first = report["outcomes"][0]
        assert first["state"] == "FAILED", first
        assert "RO-19 2008 the Transaction UID comes only in that reply" in first["reason"]
        assert "the TMS must" in result.stderr


def test_a_cancel_the_tms_took_before_a_kill_is_settled_by_the_restarted_device(tmp_path):
    """kill -9 after the TMS took a CANCELED but before its reply reached the device: the
    journal still says the cancel was on its way. The restarted device finds the UPS
    CANCELED at the TMS as it had decided, and reports it settled with the reason it was
    canceled for, not as a problem of its own."""
    port = free_port()
    site = start_site(tmp_path / "site", port, 1, "--fault-hold-reply", "canceled=120")
    report_dir = tmp_path / "report"
    try:
        run = run_command(site, port, tmp_path / "device", "--interrupt", "2:50")
        killed = subprocess.Popen(run, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(
                lambda: any(r.state == "CANCELED" for r in _deliveries(tmp_path / "site")),
                120,
                "the TMS to take the device's CANCELED",
            )
        finally:
            killed.kill()
            killed.wait(timeout=10)
        assert killed.returncode == -9, killed.stderr.read()[-3000:]
        again = _run([*run, "--report-dir", str(report_dir)])
    finally:
        site.stop()
    assert "Traceback" not in again.stderr, again.stderr[-3000:]
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads((report_dir / "run-report.json").read_text())
    (canceled,) = [r for r in _deliveries(tmp_path / "site") if r.state == "CANCELED"]
    outcome = next(
        o for o in report["outcomes"] if o["sop_instance_uid"] == canceled.sop_instance_uid
    )
    assert (outcome["state"], outcome["settled"]) == ("CANCELED", True)
    assert "MACHINE termination" in outcome["reason"], outcome
    assert report["problems"] == [] and report["final_pending"] == []
