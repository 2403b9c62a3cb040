"""A soak on Locust: a master and 2 workers on localhost stand in for 2 machines.

The reference TMS runs as its own ``tdw-emu tms`` process, feeding every station that
queries and mapping each worker's AE titles (W01*, W02*) to that worker's shared receiver,
as it would map two machines. Locust runs headless; the master's verdict, its CSV report
and the TMS's UPS table are what is checked.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from emulator.net.ports import free_port
from emulator.reference.ups_store import UpsStore
from emulator.soak import locustfile_path
from tests.conftest import start_cli_process


def _locust(*args: str, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(locustfile_path()), *args],
        env=os.environ | env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def test_master_and_two_workers_against_a_tms_process(tmp_path):
    receivers = {"W01": free_port(), "W02": free_port()}
    tms = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0",
        "--archive-port", "0",
        "--feed", "SOAK*",
        "--seed-size", "small",
        *(arg for fid, port in receivers.items() for arg in ("--peer", f"{fid}*@127.0.0.1:{port}")),
        ready="ready",
        timeout=120,
    )  # fmt: skip
    verdict_path = tmp_path / "verdict.json"
    master_port = free_port()
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("master", "W01", "W02")}
    try:
        master = _locust(
            "--headless", "--master",
            "--master-bind-host", "127.0.0.1",
            "--master-bind-port", str(master_port),
            "--expect-workers", "2",
            "-u", "4", "-r", "4",
            "--tdw-duration", "25s",
            "--stop-timeout", "120",
            "--tdw-tms", "TMS@{}:{}".format(*tms.addresses["TMS"]),
            "--tdw-archive", "ARCHIVE@{}:{}".format(*tms.addresses["ARCHIVE"]),
            "--tdw-time-scale", "0.02",
            "--tdw-verdict", str(verdict_path),
            "--csv", str(tmp_path / "locust"),
            env={},
            log=logs["master"],
        )  # fmt: skip
        workers = [
            _locust(
                "--worker",
                "--master-host",
                "127.0.0.1",
                "--master-port",
                str(master_port),
                env={"TDW_FLEET_ID": fid, "TDW_LISTEN": f"127.0.0.1:{port}"},
                log=logs[fid],
            )
            for fid, port in receivers.items()
        ]
        master.wait(timeout=300)
        for worker in workers:
            worker.wait(timeout=60)
    finally:
        tms.stop()
        for log in logs.values():
            log.close()
    output = (tmp_path / "master.log").read_text()
    assert master.returncode == 0, output[-3000:]
    verdict = json.loads(verdict_path.read_text())
    assert verdict["ok"], verdict["problems"]
    assert verdict["devices"] == 4
    assert verdict["sessions"]["completed"] >= 4
    records = verdict["records"]
    assert records["records_stored"] > 0
    assert records["records_in_archive"] == records["records_stored"]
    assert records["lost_records"] == records["lost_beams"] == 0

    # Both workers ran devices: the master's summary names each worker's count.
    summary = json.loads(output.split("tdw verdict ", 1)[1].split(" written to", 1)[0])
    assert sorted(summary["devices_by_worker"].values()) == [2, 2]

    # Every DIMSE exchange is a Locust request, named by what it asked for.
    with (tmp_path / "locust_stats.csv").open() as handle:
        stats = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ("C-FIND", "C-MOVE", "N-ACTION IN PROGRESS", "N-ACTION COMPLETED", "N-SET"):
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, name
    assert int(stats["C-STORE"]["Request Count"]) >= records["records_stored"]

    # Stopped gracefully: no UPS left IN PROGRESS at the TMS.
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    try:
        counts = ups.count_by_state()
    finally:
        ups.close()
    assert counts.get("in_progress", 0) == 0
    assert counts.get("completed", 0) >= 4


def test_soak_locust_command_judges_the_run(tmp_path):
    """``tdw-emu soak --locust`` starts the TMS, a master and 2 workers, and the reports."""
    out = tmp_path / "verdict.json"
    proc = start_cli_process(
        "soak", "--embedded", "--locust", "--workers", "2",
        "--devices", "2", "--duration", "10s", "--time-scale", "0.02",
        "--json", str(out), "--locust-report", str(tmp_path / "report"),
        ready="PASS", timeout=300,
    )  # fmt: skip
    proc.process.wait(timeout=60)
    assert proc.process.returncode == 0, "\n".join(proc.output)
    verdict = json.loads(out.read_text())
    assert verdict["ok"] and verdict["devices"] == 2
    assert verdict["tms"].get("in_progress", 0) == 0 and verdict["tms"]["completed"] >= 2
    html = (tmp_path / "report" / "locust.html").read_text()
    assert "N-ACTION IN PROGRESS" in html
