"""A soak with more devices than the machine holds at the pace asked: admission control
(profiles/soak.yaml; here a 20 ms bound on the devices' recent DIMSE p95, so a test machine
is overloaded for sure) holds new sessions instead of making latency, every device still
ends the session it is in, every worker returns its part of the verdict, and the verdict
names the overload as such."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(400)
def test_an_overloaded_soak_holds_new_sessions_and_leaves_nothing_in_progress(tmp_path):
    verdict_file = tmp_path / "verdict.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "emulator.cli", "soak", "--embedded",
            "--devices", "20", "--duration", "20", "--time-scale", "0.2", "--workers", "2",
            "--admit-p95", "0.02", "--json", str(verdict_file),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    verdict = json.loads(verdict_file.read_text())
    overload = verdict["overload"]
    assert overload["holds"] >= 1 and overload["held_s"] > 0
    assert overload["peak_recent_p95_ms"] > 20
    assert any(p.startswith("overloaded: new sessions were held") for p in verdict["problems"])
    assert not [p for p in verdict["problems"] if "without a verdict" in p]
    assert verdict["tms"].get("in_progress", 0) == 0, verdict["tms"]
    assert verdict["records"]["lost_records"] == 0
    assert "overloaded" in result.stderr
