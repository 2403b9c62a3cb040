"""Loopback ports for peers that cannot bind port 0 themselves (DCMTK, Orthanc, C-MOVE
destinations a TMS must know in advance), shared by the tests and the benchmarks."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

_CHOOSER = random.SystemRandom()  # unaffected by any random.seed() in the caller


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free right now on 127.0.0.1, chosen below the kernel's ephemeral range.

    A port the kernel handed out for a bind to port 0 comes from the same range as the
    local ports of outgoing connections, so by the time a peer binds it, an association's
    client socket may hold it ("Address already in use" under load). Ports below that
    range are never taken that way; random choice keeps parallel test workers apart.
    """
    low, _high = _ephemeral_range()
    first = 10000 if low > 12000 else 1024
    for _ in range(200):
        port = _CHOOSER.randrange(first, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a machine with no room below the range
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Returns once something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
