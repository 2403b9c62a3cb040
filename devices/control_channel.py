"""The client side of a controller simulator's control channel (hil/faults.py).

JSON lines on a loopback socket: one command, one reply. A test injects faults through it;
the host tells a simulator which patient lies on its couch (a real controller has no such
channel, and images the real patient).
"""

from __future__ import annotations

import json
import socket


def send_command(address: tuple[str, int], command: dict, timeout: float = 5.0) -> dict:
    """One command, one reply."""
    with socket.create_connection(address, timeout=timeout) as sock, sock.makefile("rw") as stream:
        stream.write(json.dumps(command) + "\n")
        stream.flush()
        return json.loads(stream.readline())
