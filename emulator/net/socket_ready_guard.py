"""Lets pynetdicom read sockets whose descriptor number is 1024 or more.

pynetdicom (3.0.4) asks ``AssociationSocket.ready`` whether data is waiting with
``select.select()``, which cannot take a descriptor at or above FD_SETSIZE (1024): it
raises ValueError, pynetdicom reads that as "transport connection closed" (Evt17) and the
association dies without a word. A soak process holds several descriptors per device (its
sockets and the SQLite files of its store, outbox and journal), so from about a hundred
devices on, every new association failed: measured, 200 devices at time scale 1 completed
no session, and the guard's accept thread raised "filedescriptor out of range in select()"
3,219 times in 100 s.

The guard asks the same question with ``select.poll()``, which has no such limit, and
keeps everything else as pynetdicom has it: the zero timeout, Evt17 on a socket error, and
data an SSL socket has already decrypted (pynetdicom #528).
"""

from __future__ import annotations

import select
import ssl

from pynetdicom.transport import AssociationSocket

_original_ready = AssociationSocket.ready
# poll() events that mean a read will not block: data, urgent data, hang-up or error.
READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def readable_now(sock) -> bool:
    """True if a read on ``sock`` would not block; raises OSError/ValueError if it is gone."""
    poller = select.poll()
    poller.register(sock, READABLE)
    return bool(poller.poll(0))


def _ready(self: AssociationSocket) -> bool:
    if self.socket is None or self._is_connected is False:
        return False
    try:
        ready = readable_now(self.socket)
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # Evt17: transport connection closed
        return False
    if isinstance(self.socket, ssl.SSLSocket):
        return ready or bool(self.socket.pending())
    return ready


def install() -> None:
    """Route every association's readiness check through poll() (idempotent)."""
    AssociationSocket.ready = property(_ready)


def installed() -> bool:
    return AssociationSocket.ready.fget is _ready
