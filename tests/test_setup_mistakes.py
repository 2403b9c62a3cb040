"""Set-up mistakes a newcomer makes: each gets one sentence naming what is wrong, exit 2,
and no traceback; nothing is half-created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, start_cli_process


def _tdw(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _one_sentence(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def running_tms(tmp_path_factory):
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path_factory.mktemp("busy") / "site"),
        "--port", "0", "--archive-port", "0", "--accept-any-ae",
        ready="ready",
    )  # fmt: skip
    yield site
    site.stop()


def test_a_tms_or_an_archive_on_a_port_in_use_names_the_port(running_tms, tmp_path):
    busy = running_tms.addresses["TMS"][1]
    tms = _tdw("tms", "--data-dir", str(tmp_path / "a"), "--port", str(busy),
               "--archive-port", "0", "--accept-any-ae")  # fmt: skip
    _one_sentence(tms, f"127.0.0.1:{busy}", "already in use")
    archive = _tdw("archive", "--data-dir", str(tmp_path / "b"), "--port", str(busy),
                   "--accept-any-ae")  # fmt: skip
    _one_sentence(archive, f"127.0.0.1:{busy}", "already in use")


def test_a_device_whose_listen_port_is_in_use_names_it(running_tms, tmp_path):
    busy = running_tms.addresses["ARCHIVE"][1]
    tms_port = running_tms.addresses["TMS"][1]
    run = _tdw("run", "--kind", "pds", "--station", "LINAC1",
               "--tms", f"TMS@127.0.0.1:{tms_port}", "--archive", f"ARCHIVE@127.0.0.1:{busy}",
               "--listen-port", str(busy), "--data-dir", str(tmp_path / "d"))  # fmt: skip
    _one_sentence(run, f"127.0.0.1:{busy}", "already in use")


def test_a_tms_that_never_answers_is_a_set_up_problem_said_after_the_window(tmp_path):
    port = free_port()  # nothing listens there
    run = _tdw("run", "--kind", "pds", "--station", "LINAC1",
               "--tms", f"TMS@127.0.0.1:{port}", "--archive", f"ARCHIVE@127.0.0.1:{port}",
               "--listen-port", "0", "--data-dir", str(tmp_path / "d"))  # fmt: skip
    _one_sentence(run, f"127.0.0.1:{port}", "did not answer within 15 s", "--tms-retry-window")


def test_nothing_scheduled_for_the_station_is_said(running_tms, tmp_path):
    tms, archive = running_tms.addresses["TMS"], running_tms.addresses["ARCHIVE"]
    run = _tdw("run", "--kind", "pds", "--station", "NOWHERE1",
               "--tms", f"TMS@127.0.0.1:{tms[1]}", "--archive", f"ARCHIVE@127.0.0.1:{archive[1]}",
               "--listen-port", "0", "--data-dir", str(tmp_path / "d"))  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "holds nothing for station NOWHERE1" in run.stderr
    assert "tdw-emu tms --seed NOWHERE1" in run.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["seed", "--out", "README.md"], ["README.md is a file"]),
        (
            [
                "archive",
                "--data-dir",
                "{tmp}/a",
                "--port",
                "0",
                "--accept-any-ae",
                "--import",
                "{tmp}/nosuchdir",
            ],
            ["nosuchdir does not exist"],
        ),
        (
            ["tms", "schedule", "--data-dir", "{tmp}/nosuchsite", "--station", "LINAC1"],
            ["holds no TMS"],
        ),
    ],
)
def test_a_wrong_path_gets_one_sentence_and_creates_nothing(args, words, tmp_path):
    result = _tdw(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    _one_sentence(result, *words)
    assert not (tmp_path / "nosuchsite").exists()
    assert Path(REPO / "README.md").is_file()
