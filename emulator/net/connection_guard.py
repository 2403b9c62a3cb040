"""Admission before association: no single peer can block a server's accept or its slots.

pynetdicom's ``AssociationServer`` does the TLS handshake inside ``get_request``, on its one
accept thread, with no timeout: one TCP connection that never sends a ClientHello froze
the TMS for 90 s. And every accepted connection becomes an ``Association`` at once, which
holds one of ``maximum_associations`` until the ACSE timeout, even one that never sends an
A-ASSOCIATE-RQ or that the peer has already closed: forty idle connections locked every
caller out ("Local limit exceeded").

:class:`GuardedAssociationServer` narrows that, and only that:

- ``get_request`` accepts the raw socket; the accept thread never reads from a peer. When
  an address already has ``max_pending_per_address`` connections waiting for admission, or
  the server ``max_pending``, the oldest waiting one is closed (see ``get_request``).
- ``finish_request`` (the per-connection thread socketserver starts) does the TLS handshake
  with a deadline, then waits until the A-ASSOCIATE-RQ is there: on a plain socket the whole
  PDU (peeked, left in place for pynetdicom), under TLS its first bytes. A connection that
  sends nothing within ``request_deadline`` is closed; one the peer closed is closed at once.
  Only then does pynetdicom create the Association that takes a slot.

Each refusal is counted (``on_refused(reason)``) for the metrics. Everything after admission
is pynetdicom's, unchanged; ``tests/test_connection_guard.py`` shows both halves.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom.transport import ThreadedAssociationServer

from emulator.net.socket_ready_guard import READABLE

A_ASSOCIATE_RQ = 0x01
PDU_HEADER = struct.Struct(">BBI")  # type, reserved, length (PS3.8 9.3.1)


@dataclass(frozen=True)
class AdmissionLimits:
    """How long a connection may take to become an association, and how many may wait."""

    handshake_s: float = 5.0  # TLS handshake
    request_deadline_s: float = 5.0  # the A-ASSOCIATE-RQ, after the connection (and TLS)
    # Connections waiting for admission. Generous: a waiting connection costs one thread for
    # at most the deadlines above, never an association slot.
    max_pending_per_address: int = 64
    max_pending: int = 256
    # A waiting connection this old may be closed to make room: a caller that means to
    # associate has sent its A-ASSOCIATE-RQ long before.
    evict_after_s: float = 0.5


@dataclass
class _Waiting:
    """A connection between accept and its A-ASSOCIATE-RQ."""

    sock: socket.socket
    host: str
    since: float
    evicted: bool = False


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission in front of it (module docstring)."""

    limits: AdmissionLimits = AdmissionLimits()
    on_refused: Callable[[str], None] = staticmethod(lambda reason: None)
    # socketserver listens with a backlog of 5: forty connections at once overflow it, the
    # kernel drops SYNs, and a legitimate caller's connect waits out the 1 s SYN retry.
    request_queue_size = 1024

    def service_actions(self) -> None:
        """pynetdicom runs a full ``gc.collect()`` here every 60 polls of every server (one
        per device receiver in a soak): about 3.4 full collections a second of a 550 MB heap
        with 100 servers. CPython's own generational collector frees finished associations;
        tests/test_connection_guard.py shows the threads and the objects go without it."""

    def _waiting(self) -> tuple[threading.Lock, dict[int, _Waiting]]:
        if "_guard_lock" not in self.__dict__:
            self.__dict__.setdefault("_guard_waiting", {})
            self.__dict__.setdefault("_guard_lock", threading.Lock())
        return self.__dict__["_guard_lock"], self.__dict__["_guard_waiting"]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accepts without reading: the TLS handshake and the wait happen per connection.

        When an address (or the server) has too many connections waiting, the oldest one
        that has waited at least ``evict_after_s`` is closed, not the new one: a caller
        that means to associate sends its A-ASSOCIATE-RQ within milliseconds, so the old
        waiting ones are idle, and a flood of idle connections from one address cannot keep
        a new caller out. Only if none has waited that long is the newcomer refused.
        """
        client, address = self.socket.accept()
        lock, waiting = self._waiting()
        now = time.monotonic()
        evictable_before = now - self.limits.evict_after_s
        refused = False
        with lock:
            alive = [w for w in waiting.values() if not w.evicted]
            same = [w for w in alive if w.host == address[0]]
            over_host = len(same) + 1 - self.limits.max_pending_per_address
            over_all = len(alive) + 1 - self.limits.max_pending
            old_same = [w for w in same if w.since <= evictable_before]
            old_all = [w for w in alive if w.since <= evictable_before]
            victims = old_same[: max(over_host, 0)]
            rest = [w for w in old_all if w not in victims]
            victims += rest[: max(over_all - len(victims), 0)]
            if len(victims) < max(over_host, over_all, 0):
                refused = True  # nobody idle long enough to make room: the newcomer waits
            else:
                waiting[id(client)] = _Waiting(client, address[0], now)
            for victim in victims:
                victim.evicted = True
        for victim in victims:
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)  # its admission thread sees EOF
        if refused:
            self.on_refused("too_many_pending")
            with contextlib.suppress(OSError):
                client.close()
            raise OSError("admission: too many connections waiting")  # socketserver drops it
        return client, address

    def finish_request(self, request, client_address) -> None:
        lock, waiting = self._waiting()
        try:
            admitted = self._admit(request)
        finally:
            with lock:
                entry = waiting.pop(id(request), None)
        if admitted is None:
            return
        if entry is not None and entry.evicted:
            self._refuse(admitted, "evicted")
            return
        admitted.settimeout(None)
        super().finish_request(admitted, client_address)

    def _evicted(self, sock: socket.socket) -> bool:
        lock, waiting = self._waiting()
        with lock:
            entry = waiting.get(id(sock))
            return entry is not None and entry.evicted

    def _admit(self, sock: socket.socket) -> socket.socket | None:
        """The socket ready for pynetdicom, or None (closed, and the reason counted)."""
        try:
            if self.ssl_context:
                sock.settimeout(self.limits.handshake_s)
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except TimeoutError:
                    return self._refuse(sock, "tls_handshake_timeout")
                except (ssl.SSLError, OSError):
                    return self._refuse(sock, "tls_handshake_failed")
            sock.settimeout(None)
            reason = self._wait_for_request(sock)
            return sock if reason is None else self._refuse(sock, reason)
        except OSError:
            return self._refuse(sock, "connection_error")

    def _wait_for_request(self, sock: socket.socket) -> str | None:
        """None once the A-ASSOCIATE-RQ is there; else why the connection is refused."""
        deadline = time.monotonic() + self.limits.request_deadline_s
        tls = isinstance(sock, ssl.SSLSocket)
        while True:
            remaining = deadline - time.monotonic()
            if tls and sock.pending():
                return None
            if remaining <= 0:
                return "no_association_request"
            # poll(), not select(): a fleet process has descriptors past FD_SETSIZE.
            poller = select.poll()
            poller.register(sock, READABLE)
            if not poller.poll(remaining * 1000):
                return "no_association_request"
            if tls:
                return None  # TLS records cannot be peeked; the first bytes are there
            head = sock.recv(PDU_HEADER.size + 65536, socket.MSG_PEEK)
            if not head:
                return "closed_by_peer"
            if head[0] != A_ASSOCIATE_RQ:
                return "not_an_association_request"
            if len(head) >= PDU_HEADER.size:
                _, _, length = PDU_HEADER.unpack(head[: PDU_HEADER.size])
                if len(head) >= PDU_HEADER.size + min(length, 65536):
                    return None
            time.sleep(0.005)  # part of the PDU is in; wait for the rest

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        if reason != "evicted" and self._evicted(sock):
            reason = "evicted"
        self.on_refused(reason)
        with contextlib.suppress(OSError):
            sock.close()
        return None
