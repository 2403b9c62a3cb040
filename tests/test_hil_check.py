"""`tdw-emu hil check` passes controller-sim and fails each deliberately broken variant,
naming the hil/PROTOCOL.md clause it broke; it writes JUnit either way."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import REPO, start_cli_process


def _check(tmp_path, *quirks: str) -> tuple[subprocess.CompletedProcess, ET.Element]:
    breaks = [a for q in quirks for a in ("--break", q)]
    controller = start_cli_process(
        "hil controller-sim", "--tcp", "127.0.0.1:0", "--time-scale", "0.05", *breaks,
        ready="controller listening on",
    )  # fmt: skip
    try:
        printed = next(line for line in controller.output if "listening on tcp://" in line)
        device = re.search(r"(tcp://\S+)", printed)[1]
        junit = tmp_path / "hil-check.xml"
        result = subprocess.run(
            [sys.executable, "-m", "emulator.cli", "hil", "check", "--device", device,
             "--junit", str(junit)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
    finally:
        controller.stop()
    return result, ET.parse(junit).getroot()


def test_controller_sim_passes_every_check(tmp_path):
    result, junit = _check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert junit.get("tests") == "7" and junit.get("failures") == "0"
    names = {case.get("name") for case in junit.iter("testcase")}
    assert names == {
        "handshake and version",
        "every message type",
        "NAK and retransmission",
        "heartbeat",
        "answers while moving",
        "interrupt during a beam",
        "reconnect with last_delivery",
    }


@pytest.mark.parametrize(
    ("quirk", "check", "clause"),
    [
        ("no-progress", "answers while moving", "Timing"),
        ("silent-while-busy", "answers while moving", "Timing"),
        ("forgets-last-delivery", "reconnect with last_delivery", "Safety rules on the host"),
    ],
)
def test_a_broken_controller_fails_the_clause_it_breaks(tmp_path, quirk, check, clause):
    result, junit = _check(tmp_path, quirk)
    assert result.returncode == 1, result.stdout
    assert f"FAIL {check}: PROTOCOL.md {clause}" in result.stderr
    failed = {
        case.get("name"): case.find("failure").get("message")
        for case in junit.iter("testcase")
        if case.find("failure") is not None
    }
    assert failed.get(check) == f"PROTOCOL.md {clause}", failed
    if quirk != "silent-while-busy":
        # A deaf controller may also miss the next check's HELLO while its CBCT finishes;
        # the other variants break exactly one clause.
        assert len(failed) == 1, failed
