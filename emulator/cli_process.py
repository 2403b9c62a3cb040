"""A ``tdw-emu`` command run as a child process: started, its addresses read, stopped.

A multi-process soak starts the reference TMS and its workers this way, and the tests start
every server they check from the outside the same way. The child prints
"AE listening on HOST:PORT" lines and then a ready line; this reads them, then keeps
draining its output so a chatty child never blocks on a full pipe.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"(\S+) listening on (\S+):(\d+)")
METRICS_ON = "metrics on "  # what a tdw-emu command prints where it serves /metrics


def printed_metrics_urls(lines: list[str]) -> list[str]:
    """Every /metrics URL a tdw-emu command printed ('metrics on URL'), in order."""
    return [line.split(METRICS_ON, 1)[1].strip() for line in lines if METRICS_ON in line]


@dataclass
class CliProcess:
    """A ``tdw-emu`` child process, the addresses it printed and everything it said."""

    process: subprocess.Popen
    host: str
    port: int
    output: list[str]
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cli(
    command: list[str],
    ready: str = "listening on",
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> CliProcess:
    """Runs ``tdw-emu COMMAND...`` and waits for a line containing ``ready``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
    )
    output: list[str] = []
    addresses: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line.rstrip())
        match = LISTENING.search(line)
        if match:
            addresses[match[1]] = (match[2], int(match[3]))
        if ready in line:
            threading.Thread(
                target=lambda: output.extend(text.rstrip() for text in process.stdout),
                daemon=True,
            ).start()
            host, port = next(iter(addresses.values()), ("", 0))
            return CliProcess(process, host, port, output, addresses)
    process.kill()
    process.wait(timeout=10)
    raise RuntimeError(f"tdw-emu {' '.join(command[:1])} did not start:\n" + "\n".join(output))
