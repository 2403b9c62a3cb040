"""The archive's YAML config and its flags are equivalent, and bad settings fail clearly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emulator.config import ConfigError, archive_config, load_yaml_config, merge
from emulator.net import scu
from emulator.net.peers import Peer, PeerError

REPO = Path(__file__).resolve().parent.parent


def test_yaml_and_flags_give_the_same_config(tmp_path):
    config_file = tmp_path / "archive.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "archive": {
                    "data_dir": str(tmp_path / "data"),
                    "ae_title": "ARCH1",
                    "port": 0,
                    "peers": ["DEV1@127.0.0.1:11113", "DEV2@[::1]:11114"],
                    "allow": ["TPS"],
                    "duplicate_policy": "replace",
                    "uids": "trial",
                }
            }
        )
    )
    from_file = archive_config(load_yaml_config(config_file, "archive"))
    from_flags = archive_config(
        merge(
            {},
            {
                "data_dir": str(tmp_path / "data"),
                "ae_title": "ARCH1",
                "port": 0,
                "peer": ["DEV1@127.0.0.1:11113", "DEV2@[::1]:11114"],
                "allow": ["TPS"],
                "duplicate_policy": "replace",
                "uids": "trial",
            },
        )
    )
    assert from_file == from_flags
    assert from_file.calling_allow_list() == ["DEV1", "DEV2", "TPS"]
    assert from_file.peers[1] == Peer("DEV2", "::1", 11114)


def test_flags_override_the_file(tmp_path):
    merged = merge({"data_dir": "a", "port": 1, "peers": ["X@h:1"]}, {"port": 0, "peer": []})
    assert merged == {"data_dir": "a", "port": 0, "peers": ["X@h:1"]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "data_dir is required"),
        ({"data_dir": "d", "port": 70000}, "out of range"),
        ({"data_dir": "d", "peer": ["nohost"]}, "AET@HOST:PORT"),
        ({"data_dir": "d", "ae_title": "A" * 17}, "invalid AE title"),
        ({"data_dir": "d", "uids": "draft"}, "uids must be"),
        ({"data_dir": "d", "duplicate_policy": "overwrite"}, "duplicate_policy"),
        ({"data_dir": "d", "colour": "blue"}, "unknown archive settings: colour"),
    ],
)
def test_bad_settings_name_the_problem(values, message):
    with pytest.raises((ConfigError, PeerError), match=message):
        archive_config(values)


def test_archive_command_refuses_to_accept_nobody(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "archive", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no caller would be accepted" in result.stderr


def test_archive_command_serves_from_a_yaml_config(tmp_path, archive_process_factory):
    config_file = tmp_path / "archive.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "archive": {
                    "data_dir": str(tmp_path / "d"),
                    "ae_title": "YAMLARCH",
                    "port": 0,
                    "accept_any_ae": True,
                }
            }
        )
    )
    proc = archive_process_factory("--config", str(config_file))
    assert proc.host == "127.0.0.1"  # loopback unless configured otherwise
    assert scu.echo("WHOEVER", Peer("YAMLARCH", proc.host, proc.port)) == 0x0000
    assert any("accepted callers: any" in line for line in proc.output)


def test_demo_command_runs_end_to_end_at_its_own_pace(tmp_path):
    """As `make demo` runs it: no --time-scale, so the demo's default pace (0.02) holds.
    Two sessions each turn the gantry once for a CBCT (60 s of machine time): at that pace
    the run cannot take less than 2 x 60 x 0.02 s, and a demo that ran at full speed
    (scale 0) would."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "demo", "--data-dir", str(tmp_path),
         "--interrupt", "2:40"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CONTINUATION delivered the rest" in result.stdout
    assert "MACHINE" in result.stdout and "RTRECORD" in result.stdout
    assert elapsed >= 2 * 60 * 0.02, elapsed


def test_run_command_against_a_tms_process(tmp_path, archive_process_factory):
    import json

    from tests.conftest import free_port

    port = free_port()
    tms = archive_process_factory(
        "--data-dir",
        str(tmp_path / "site"),
        "--port",
        "0",
        "--archive-port",
        "0",
        "--peer",
        f"PDS1@127.0.0.1:{port}",
        "--seed",
        "LINAC1",
        command="tms",
        ready="ready",
    )
    (tms_host, tms_port), (archive_host, archive_port) = (
        tms.addresses["TMS"],
        tms.addresses["ARCHIVE"],
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {
                    "kind": "pds",
                    "station": "LINAC1",
                    "tms": f"TMS@{tms_host}:{tms_port}",
                    "archive": f"ARCHIVE@{archive_host}:{archive_port}",
                    "ae_title": "PDS1",
                    "listen_port": port,
                    "time_scale": 0,
                    "sessions": 2,
                    "interrupt": "2:40",
                }
            }
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "run",
            "--config",
            str(config),
            "--report-dir",
            str(tmp_path / "report"),
            "--wait",
            "10",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report" / "run-report.json").read_text())
    assert report["ok"] and report["sessions"] == 2
    assert report["findings"] == []  # the reference TMS breaks no conformance rule
    traffic = (tmp_path / "report" / "dimse-traffic.jsonl").read_text().splitlines()
    # Claim and final state of each UPS, and the UPS Watch subscribe and unsubscribe around.
    assert sum('"N-ACTION-RSP"' in line for line in traffic) == 8 * 4
    states = [o["state"] for o in report["outcomes"]]
    assert states == ["COMPLETED"] * 3 + ["CANCELED"] + ["COMPLETED"] * 4
    delivered: dict[str, float] = {}
    for outcome in report["outcomes"]:
        for beam, mu in outcome["delivered"].items():
            delivered[beam] = delivered.get(beam, 0.0) + mu
    assert delivered == pytest.approx({"1": 100.0, "2": 100.0, "3": 100.0, "4": 100.0})


def test_run_command_fails_when_the_worklist_is_empty(tmp_path, archive_process_factory):
    tms = archive_process_factory(
        "--data-dir",
        str(tmp_path / "site"),
        "--port",
        "0",
        "--archive-port",
        "0",
        "--allow",
        "PDS1",
        command="tms",
        ready="ready",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "run",
            "--kind",
            "pds",
            "--station",
            "LINAC9",
            "--tms",
            "TMS@{}:{}".format(*tms.addresses["TMS"]),
            "--archive",
            "ARCHIVE@{}:{}".format(*tms.addresses["ARCHIVE"]),
            "--ae-title",
            "PDS1",
            "--listen-port",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    assert "holds nothing for station LINAC9" in result.stderr
    assert "tdw-emu tms --seed LINAC9" in result.stderr


def test_tms_config_from_yaml_matches_flags(tmp_path):
    from emulator.config import site_config

    values = {
        "data_dir": str(tmp_path),
        "ae_title": "TMS1",
        "archive_ae_title": "ARCH1",
        "port": 0,
        "archive_port": 0,
        "peer": ["LINAC1@127.0.0.1:11113"],
        "profile": "tdw-ii",
        "uids": "trial",
    }
    config_file = tmp_path / "tms.yaml"
    config_file.write_text(yaml.safe_dump({"tms": values}))
    assert site_config(load_yaml_config(config_file, "tms")) == site_config(merge({}, values))
    with pytest.raises(ConfigError, match="different AE titles"):
        site_config({"data_dir": "d", "ae_title": "X", "archive_ae_title": "X", "allow": ["A"]})
    with pytest.raises(ConfigError, match="no caller would be accepted"):
        site_config({"data_dir": "d"})


def test_tms_schedule_command_creates_fraction_sessions(tmp_path, archive_process_factory):
    from emulator.reference.ups_store import UpsStore
    from emulator.store import ObjectStore

    first = archive_process_factory(
        "--data-dir",
        str(tmp_path),
        "--port",
        "0",
        "--archive-port",
        "0",
        "--allow",
        "DEVICE",
        "--seed",
        "LINAC1",
        command="tms",
        ready="ready",
    )
    first.stop()
    store = ObjectStore(tmp_path / "archive")
    plan_uid = store.select("modality = 'RTPLAN'")[0].sop_instance_uid
    store.close()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "tms",
            "schedule",
            "--data-dir",
            str(tmp_path),
            "--plan-uid",
            plan_uid,
            "--station",
            "LINAC2",
            "--fractions",
            "5",
            "--first-fraction",
            "2",
            "--start",
            "203001070800",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("scheduled session") == 5
    ups = UpsStore(tmp_path / "tms" / "ups.sqlite3")
    try:
        sessions = [s for s in ups.sessions() if s.station_code == "LINAC2"]
        assert [s.fraction_number for s in sessions] == [2, 3, 4, 5, 6]
        starts = sorted(
            {
                r.dataset.ScheduledProcedureStepStartDateTime[:8]
                for r in ups.select("station_code = 'LINAC2'")
            }
        )
        # 2030-01-07 is a Monday: five weekdays, no weekend.
        assert starts == ["20300107", "20300108", "20300109", "20300110", "20300111"]
        assert len(ups.select("station_code = 'LINAC2'")) == 20
    finally:
        ups.close()


def test_a_device_the_tms_does_not_know_gets_one_sentence_and_exit_2(
    tmp_path, archive_process_factory
):
    """The README's first mistake to make: a TMS that knows LINAC1, a device calling as
    PDS1. The TMS rejects the association (calling AE title not recognized); the device
    says so in one sentence naming the fix, exits 2 (a set-up problem) at once instead of
    retrying for the TMS retry window, and prints no traceback (unless -v)."""
    from tests.conftest import free_port

    port = free_port()
    tms = archive_process_factory(
        "--data-dir", str(tmp_path / "site"), "--port", "0", "--archive-port", "0",
        "--peer", f"LINAC1@127.0.0.1:{port}", "--seed", "LINAC1",
        command="tms", ready="ready",
    )  # fmt: skip
    tms_port, archive_port = tms.addresses["TMS"][1], tms.addresses["ARCHIVE"][1]
    command = [
        sys.executable, "-m", "emulator.cli", "run", "--kind", "pds", "--station", "LINAC1",
        "--tms", f"TMS@127.0.0.1:{tms_port}", "--archive", f"ARCHIVE@127.0.0.1:{archive_port}",
        "--ae-title", "PDS1", "--listen-port", str(port), "--data-dir", str(tmp_path / "dev"),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 30  # not the 120 s retry window
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tdw-emu run:")]
    assert lines == [
        f"tdw-emu run: TMS@127.0.0.1:{tms_port} rejected the association permanently: it does "
        "not accept the calling AE title PDS1: the peer must know it (a reference TMS or "
        "Archive: --peer PDS1@HOST:PORT, or --allow PDS1)"
    ], result.stderr
    with_v = [*command[:3], "-v", *command[3:]]  # -v is tdw-emu's own flag
    verbose = subprocess.run(with_v, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_help_shows_defaults_and_what_is_required(capsys):
    """--help tells the truth without reading the code: each default that is a value, and
    which options a command cannot run without (issue [8/8])."""
    from emulator.cli import main

    def help_of(*command: str) -> str:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    soak = help_of("soak")
    for shown in ("1 real time (default: 0.02)", "verdict file (default: soak-verdict.json)",
                  "(default 60 + 240 x time scale)"):  # fmt: skip
        assert shown in soak, shown
    run = help_of("run")
    for option in ("--kind", "--station", "--tms", "--archive"):
        assert f"{option} " in run
    assert run.count("required") >= 4 and "(default: 0)" in run
    top = help_of()
    assert "tdw-emu demo" in top and "parses arguments" not in top


def test_a_session_split_over_a_pps_run_and_a_tdd_run_reports_no_false_finding(
    tmp_path, archive_process_factory
):
    """The TDD's worklist holds only the delivery once the PPS performed the rest: RO-17
    asks for SCHEDULED UPS, so that is the rest of a session, not a TMS returning one of
    four (the false '[error] RO-17/Response-count' a new user saw)."""
    import json

    from tests.conftest import free_port

    ports = {"PPS1": free_port(), "TDD1": free_port()}
    tms = archive_process_factory(
        "--data-dir", str(tmp_path / "site"), "--port", "0", "--archive-port", "0",
        *(a for ae, port in ports.items() for a in ("--peer", f"{ae}@127.0.0.1:{port}")),
        "--seed", "LINAC1",
        command="tms", ready="ready",
    )  # fmt: skip
    tms_address = "TMS@{}:{}".format(*tms.addresses["TMS"])
    archive_address = "ARCHIVE@{}:{}".format(*tms.addresses["ARCHIVE"])
    reports = {}
    for kind, ae in (("pps", "PPS1"), ("tdd", "TDD1")):
        result = subprocess.run(
            [
                sys.executable, "-m", "emulator.cli", "run", "--kind", kind,
                "--station", "LINAC1", "--tms", tms_address, "--archive", archive_address,
                "--ae-title", ae, "--listen-port", str(ports[ae]),
                "--data-dir", str(tmp_path / ae), "--report-dir", str(tmp_path / kind),
            ],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[error]" not in result.stdout, result.stdout
        reports[kind] = json.loads((tmp_path / kind / "run-report.json").read_text())
    assert [o["step"] for o in reports["tdd"]["outcomes"]] == ["delivery"]
    assert not [f for f in reports["tdd"]["findings"] if f["rule"] == "RO-17/Response-count"]
