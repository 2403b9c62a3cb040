"""The suite judges a slow TMS truly: a late reply is a late reply, not a late event, and a
scenario whose reply came late still leaves nothing IN PROGRESS at the TMS.

`tdw-emu tms --fault-hold-reply STATE=SECONDS` accepts a change to STATE at once (its
events leave at once) and holds only the N-ACTION's reply, outside the station lock.
"""

from __future__ import annotations

import json
import time

from emulator.cli import main
from emulator.net.peers import Peer
from tests.conftest import free_port, start_cli_process


def _devices() -> list[Peer]:
    return [Peer("TDWEMU1", "127.0.0.1", free_port()), Peer("TDWEMU2", "127.0.0.1", free_port())]


def _site(tmp_path, devices: list[Peer], *fault: str):
    peers = [arg for d in devices for arg in ("--peer", str(d))]
    return start_cli_process(
        "tms", "--data-dir", str(tmp_path / "site"), "--port", "0", "--archive-port", "0",
        "--seed-scenarios", "--seed-size", "small", *peers, *fault, ready="ready",
    )  # fmt: skip


def _suite(site, devices: list[Peer], report, *extra: str) -> int:
    tms, archive = site.addresses["TMS"], site.addresses["ARCHIVE"]
    args = ["scenarios", "run", "--report-dir", str(report)]
    args += ["--tms", f"TMS@{tms[0]}:{tms[1]}", "--archive", f"ARCHIVE@{archive[0]}:{archive[1]}"]
    for device in devices:
        args += ["--device", str(device)]
    return main([*args, *extra])


def _findings(report) -> list[dict]:
    data = json.loads((report / "conformance.json").read_text())
    return [f for s in data["scenarios"] for f in s["findings"]]


def test_a_tms_that_answers_completed_late_sends_its_events_in_time(tmp_path, capsys):
    """Each COMPLETED reply held 10 s; its State Report left at once. Event windows count
    from the request: no event finding, and 10 s is within the 30 s exchange timeout."""
    devices = _devices()
    site = _site(tmp_path, devices, "--fault-hold-reply", "completed=10")
    report = tmp_path / "report"
    try:
        code = _suite(
            site, devices, report, "--only", "normal-fraction", "--only", "events-cancel-requested"
        )
    finally:
        site.stop()
    out = capsys.readouterr().out
    findings = _findings(report)
    assert not [f for f in findings if f["rule"].startswith("CC/Event")], findings
    assert code == 0, out


def test_a_reply_beyond_the_exchange_timeout_is_a_finding_and_nothing_is_left(tmp_path, capsys):
    """The claim's reply held 20 s against a 5 s exchange timeout: one DIMSE/Reply finding
    naming the request and the 5 s, exit 1; the suite read the late reply (its Transaction
    UID, RO-19 2008) and leaves nothing IN PROGRESS at the TMS."""
    devices = _devices()
    site = _site(tmp_path, devices, "--fault-hold-reply", "in-progress=20")
    report = tmp_path / "report"
    try:
        started = time.monotonic()
        code = _suite(site, devices, report, "--dimse-timeout", "5", "--only", "claim-in-progress")
        took = time.monotonic() - started
        tms = site.addresses["TMS"]
        capsys.readouterr()
        listed = main(
            [
                "tms", "list", "--tms", f"TMS@{tms[0]}:{tms[1]}", "--calling-ae", "TDWEMU1",
                "--station", "TDWSC-C302", "--state", "IN PROGRESS", "--uids-only",
            ]
        )  # fmt: skip
        in_progress = capsys.readouterr().out.split()
    finally:
        site.stop()
    assert listed == 0
    assert in_progress == [], in_progress
    replies = [f for f in _findings(report) if f["rule"] == "DIMSE/Reply"]
    assert len(replies) == 1, replies
    assert "N-ACTION IN PROGRESS" in replies[0]["message"], replies
    assert "beyond the 5 s exchange timeout" in replies[0]["message"], replies
    assert code == 1
    assert took >= 20, f"{took:.1f} s: the late reply was not waited for"
