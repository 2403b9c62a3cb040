"""`tdw-emu hil check` passes controller-sim and fails each deliberately broken variant,
naming the hil/PROTOCOL.md clause it broke; it writes JUnit either way."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import REPO, start_cli_process


def _check(
    tmp_path, *quirks: str, only: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess, ET.Element]:
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
             "--junit", str(junit), *(a for name in only for a in ("--only", name))],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
    finally:
        controller.stop()
    return result, ET.parse(junit).getroot()


CHECKS = {
    "handshake and version": "Versioning; HELLO_REPLY",
    "every message type": "Message types",
    "NAK and retransmission": "Reliability",
    "heartbeat": "Reliability (Heartbeat)",
    "answers while moving, PROGRESS cadence": "Timing",
    "BUSY on a second long operation": "Timing",
    "ERROR LIMIT and NOT_LOADED": "Errors",
    "control point numbering": "Delivery",
    "couch move read back per axis": "Couch; Units and axes",
    "image round trip": "Images",
    "interrupt during a beam": "Controller states",
    "beam stopped when the host is lost": "Safety",
    "reconnect with last_delivery": "Safety",
}


def test_controller_sim_passes_every_check(tmp_path):
    result, junit = _check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert junit.get("tests") == str(len(CHECKS)) and junit.get("failures") == "0"
    names = {case.get("name") for case in junit.iter("testcase")}
    assert names == set(CHECKS)


# Each deliberate breakage of controller-sim (its --break quirks) and the check it fails.
BROKEN = [
    ("no-progress", "answers while moving, PROGRESS cadence"),
    ("slow-progress", "answers while moving, PROGRESS cadence"),
    ("silent-while-busy", "answers while moving, PROGRESS cadence"),
    ("no-busy", "BUSY on a second long operation"),
    ("no-limit", "ERROR LIMIT and NOT_LOADED"),
    ("cp-from-zero", "control point numbering"),
    ("swapped-couch", "couch move read back per axis"),
    ("images-one-short", "image round trip"),
    ("finishes-after-host-loss", "beam stopped when the host is lost"),
    ("forgets-last-delivery", "reconnect with last_delivery"),
]


def test_every_quirk_of_controller_sim_is_caught():
    from hil.controller_sim import QUIRKS

    assert {quirk for quirk, _ in BROKEN} == set(QUIRKS)


@pytest.mark.parametrize(("quirk", "check"), BROKEN)
def test_a_broken_controller_fails_the_clause_it_breaks(tmp_path, quirk, check):
    """The check the quirk breaks, and the one before and after it, so a check that passes
    a broken neighbour is seen too (the whole list runs against the sound controller)."""
    names = list(CHECKS)
    at = names.index(check)
    around = tuple(names[max(0, at - 1) : at + 2])
    clause = CHECKS[check]
    result, junit = _check(tmp_path, quirk, only=around)
    assert result.returncode == 1, result.stdout
    assert f"FAIL {check}: PROTOCOL.md {clause}" in result.stderr
    ran = {case.get("name") for case in junit.iter("testcase")}
    assert ran == set(around)
    failed = {
        case.get("name"): case.find("failure").get("message")
        for case in junit.iter("testcase")
        if case.find("failure") is not None
    }
    assert failed.get(check) == f"PROTOCOL.md {clause}", failed
    also = {
        # A deaf controller may also miss the next check's HELLO while its CBCT finishes.
        "silent-while-busy": set(CHECKS),
        # Index 0 breaks CONTROL_POINT's schema too, which every message type checks.
        "cp-from-zero": {"every message type"},
        # The two Safety checks share how a controller keeps its last beam-on.
        "forgets-last-delivery": {"beam stopped when the host is lost"},
        "finishes-after-host-loss": {"reconnect with last_delivery"},
    }.get(quirk, set())
    assert set(failed) - {check} <= also, failed


def test_an_unknown_check_name_is_refused_with_the_list():
    result = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "hil", "check", "--device", "tcp://127.0.0.1:9",
         "--only", "speed"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no check named 'speed'; the checks are: handshake and version" in result.stderr
