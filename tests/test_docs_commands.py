"""Every shell block of README.md and docs/*.md, run as written, so the docs cannot drift.

Each ```sh block runs in bash (``set -euo pipefail``) from a directory that looks like the
repository root (its top-level entries linked in, outputs written there), with the venv on
the PATH, as the README says. The blocks of one file run in order and share that directory:
a later block finds what an earlier one wrote. A line ending in ``&`` (or ``& NAME=$!``)
starts a server; the
harness waits for the ports it listens on (as a person waits for ``ready``) and stops what
is left of the block's processes at its end.

What the harness changes, and nothing else (SUBSTITUTIONS): every port number becomes a
free port (the same one throughout a file), addresses of other machines become 127.0.0.1
(nothing listens beyond loopback in tests), and the hours-long soaks shrink to seconds: 200
devices for 10 minutes at real time become 4 for 12 s at time scale 0.02. The set-up block
(``make demo``, ``make test``) is the one block not run here: CI runs ``make test`` itself
and tests/test_demo.py runs the demo.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, require_tool

BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)
SET_UP = {"make demo", "make test"}
# Long runs made short; each is (pattern, replacement) on the block's text.
SUBSTITUTIONS = [
    (r"--devices \d+", "--devices 4"),
    (r"(--duration|--feed-for|--tdw-duration) \d+m\b", r"\1 12s"),
    (r"(--time-scale|--tdw-time-scale) 1\b", r"\1 0.02"),
    (r"-u \d+ -r \d+", "-u 4 -r 4"),
    (r"\b(0\.0\.0\.0|10\.0\.0\.\d+|tms\.example\.org)\b", "127.0.0.1"),
]
PORT = re.compile(r"(?<![\d.])(9\d{3}|1\d{4}|5557)(?![\d.])")
# Where a server line says what it listens on.
LISTENS = re.compile(
    r"(?:--port|--archive-port|--control-port|--metrics-port|--master-bind-port)[ =](\d+)"
    r"|(?:--tcp|--web\.listen-address|--listen [\w-]+@)[ =]?[\d.]+:(\d+)"
)
WAIT_FOR_PORTS = """
tdw_wait_for_ports() {  # a server started with & is ready when its ports accept
    local deadline=$((SECONDS + 120)) pid=$1; shift
    for port in "$@"; do
        until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do
            kill -0 "$pid" 2>/dev/null || { echo "server $pid exited before :$port" >&2; exit 1; }
            ((SECONDS < deadline)) || { echo "nothing listens on :$port" >&2; exit 1; }
            sleep 0.2
        done
    done
}
"""


def shell_blocks(path: Path) -> list[str]:
    """The ```sh blocks of a Markdown file, but the set-up one."""
    blocks = [m.group(1) for m in BLOCK.finditer(path.read_text())]
    commands = [{line.split("#")[0].strip() for line in b.splitlines()} - {""} for b in blocks]
    return [b for b, c in zip(blocks, commands, strict=True) if c - SET_UP]


def as_run_here(block: str, ports: dict[str, str]) -> str:
    """The block with SUBSTITUTIONS applied, free ports, and a wait after each server."""
    for pattern, replacement in SUBSTITUTIONS:
        block = re.sub(pattern, replacement, block)
    block = PORT.sub(lambda m: ports.setdefault(m.group(1), str(free_port())), block)
    lines, command = [], ""
    for line in block.splitlines():
        command += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        lines.append(command.rstrip("\n"))
        code = command.split(" #")[0].rstrip()
        if re.search(r"&(\s+\w+=\$!)?$", code):  # "server &", or "server & NAME=$!"
            listening = [a or b for a, b in LISTENS.findall(code)]
            lines.append(f"tdw_wait_for_ports $! {' '.join(listening)}")
        command = ""
    return "\n".join(lines)


DOCS = [
    doc for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if shell_blocks(doc)
]


def _living(group: int) -> list[int]:
    """Processes of process group ``group`` not yet gone. A killed multi-threaded server's
    leader shows as a zombie while its other threads still exit, holding its sockets."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            threads = len(list((stat.parent / "task").iterdir()))
            if int(fields[2]) == group and (fields[0] != "Z" or threads > 1):
                alive.append(int(stat.parent.name))
    return alive


def _wait_until_gone(group: int) -> None:
    """A killed server still holds its port until it has exited; the next block may bind it."""
    deadline = time.monotonic() + 30
    while _living(group):
        assert time.monotonic() < deadline, f"processes {_living(group)} outlived SIGKILL"
        time.sleep(0.05)


def _workdir(tmp_path: Path) -> Path:
    """A directory that looks like the repository root: its entries linked, outputs here."""
    work = tmp_path / "repo"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", "site", "seed-data", "reports"):
            (work / entry.name).symlink_to(entry)
    return work


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_shell_block_runs_as_written(doc, tmp_path):
    blocks = shell_blocks(doc)
    for tool in ("/usr/bin/echoscu", "/usr/bin/openssl", "/usr/bin/prometheus"):
        require_tool(tool)
    work = _workdir(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "COLUMNS": "200",
    }
    ports: dict[str, str] = {}
    for number, block in enumerate(blocks, 1):
        script = "set -euo pipefail\n" + WAIT_FOR_PORTS + as_run_here(block, ports)
        log = tmp_path / f"block-{number}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                ["bash", "-c", script], cwd=work, env=env, start_new_session=True,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                process.wait(timeout=420)
            finally:
                with contextlib.suppress(ProcessLookupError):  # what the block left running
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                _wait_until_gone(process.pid)
        output = log.read_text(errors="replace")
        assert process.returncode == 0, (
            f"{doc.name} block {number} failed (exit {process.returncode}):\n{block}\n"
            f"--- output ---\n{output[-6000:]}"
        )
        assert "Traceback" not in output, f"{doc.name} block {number}:\n{output[-6000:]}"
