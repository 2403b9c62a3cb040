"""Pre-flight: a TMS that is not set up for the suite gets a setup error, not findings.

A vendor must be able to tell "my TMS broke a clause" (exit 1, JUnit failures) from "my
set-up is wrong" (exit 2, JUnit errors, no rule findings): no TMS listening, a station
with no session or with its sessions used by an earlier run, an Archive that does not know
a device as a move destination. And a reference TMS re-seeded with --fresh runs again.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from emulator.cli import main
from emulator.net.peers import Peer
from tests.conftest import free_port, start_cli_process


def _devices() -> list[Peer]:
    return [Peer("TDWEMU1", "127.0.0.1", free_port()), Peer("TDWEMU2", "127.0.0.1", free_port())]


def _suite(tms: Peer, archive: Peer, devices: list[Peer], report: Path, *only: str) -> int:
    args = ["scenarios", "run", "--tms", str(tms), "--archive", str(archive)]
    for device in devices:
        args += ["--device", str(device)]
    for name in only:
        args += ["--only", name]
    return main([*args, "--report-dir", str(report)])


def _setup_errors(report: Path) -> list[str]:
    """The JUnit errors of a stopped run, after checking it holds no failure or finding."""
    junit = ET.parse(report / "conformance-junit.xml").getroot()
    errors = junit.findall(".//error")
    assert junit.get("errors") == str(len(errors)) and errors
    assert junit.get("failures") == "0" and not junit.findall(".//failure")
    data = json.loads((report / "conformance.json").read_text())
    assert data["ok"] is False and data["scenarios"] == []  # no rule was applied
    assert [e["message"] for e in data["setup_errors"]] == [
        e.get("message").split(": ", 1)[1] for e in errors
    ]
    return [e.get("message") for e in errors]


def _tms(data_dir: Path, peers: list[Peer], *extra: str):
    site = start_cli_process(
        "tms",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--archive-port",
        "0",
        *(a for p in peers for a in ("--peer", str(p))),
        *extra,
        ready="ready",
        timeout=300,
    )
    tms = Peer("TMS", "127.0.0.1", site.addresses["TMS"][1])
    archive = Peer("ARCHIVE", "127.0.0.1", site.addresses["ARCHIVE"][1])
    return site, tms, archive


def test_no_tms_listening_is_a_setup_error(tmp_path, capsys):
    nobody = [Peer("TMS", "127.0.0.1", free_port()), Peer("ARCHIVE", "127.0.0.1", free_port())]
    assert _suite(*nobody, _devices(), tmp_path / "report") == 2
    errors = _setup_errors(tmp_path / "report")
    assert len(errors) == 2 and all(e.startswith("C-ECHO: the ") for e in errors)
    err = capsys.readouterr().err
    assert "setup error: C-ECHO: the TMS TMS@127.0.0.1" in err


def test_unset_stations_used_sessions_and_a_re_seeded_second_run(tmp_path, capsys):
    devices = _devices()
    data = tmp_path / "site"
    # The Archive knows only the first device; only the normal fraction's station is seeded.
    site, tms, archive = _tms(data, devices[:1], "--seed", "TDWSC-NORMAL")
    try:
        code = _suite(tms, archive, devices, tmp_path / "r1", "normal-fraction", "pps-tdd-split")
    finally:
        site.stop()
    assert code == 2
    errors = _setup_errors(tmp_path / "r1")
    assert any("station TDWSC-SPLIT has no session scheduled for today" in e for e in errors)
    assert any(e.startswith("C-MOVE: ARCHIVE cannot send to TDWEMU2@") for e in errors)
    assert not any("TDWEMU1@" in e for e in errors), errors
    assert len(errors) == 3, errors  # the station, and TDWEMU2 from the TMS and the Archive

    site, tms, archive = _tms(data, devices, "--fresh", "--seed-scenarios")
    try:
        first = _suite(tms, archive, devices, tmp_path / "r2", "normal-fraction")
        again = _suite(tms, archive, devices, tmp_path / "r3", "normal-fraction")
    finally:
        site.stop()
    assert first == 0
    assert again == 2  # the first run used the session
    [used] = _setup_errors(tmp_path / "r3")
    assert "station TDWSC-NORMAL has 0 unused session(s) today (1 already used)" in used
    assert "--fresh" in used

    site, tms, archive = _tms(data, devices, "--fresh", "--seed-scenarios")
    try:
        assert _suite(tms, archive, devices, tmp_path / "r4", "normal-fraction") == 0
    finally:
        site.stop()
    report = json.loads((tmp_path / "r4" / "conformance.json").read_text())
    assert report["ok"] is True and [s["name"] for s in report["scenarios"]] == ["normal-fraction"]
    capsys.readouterr()
