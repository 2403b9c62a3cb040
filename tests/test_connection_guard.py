"""Admission before association (emulator/net/connection_guard.py), against pynetdicom's
stock behaviour: the TLS handshake no longer runs on the accept thread, and a connection
becomes an association (and takes a slot) only once its A-ASSOCIATE-RQ is there."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

from pynetdicom.association import Association

from emulator.net import scu
from emulator.net.ae_factory import NetworkSettings
from emulator.net.connection_guard import AdmissionLimits
from emulator.net.peers import Peer
from emulator.net.tls import TlsConfig
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from tests.test_tls import pki  # noqa: F401  (the module-scoped test CA fixture)


def _archive(
    tmp_path, network: NetworkSettings, handshake_s: float = 1.0, associations: int = 2
) -> tuple[ArchiveServer, list[str]]:
    refused: list[str] = []
    lock = threading.Lock()

    def note(ae: str, reason: str) -> None:
        with lock:
            refused.append(reason)

    network = replace(
        network,
        admission=AdmissionLimits(handshake_s=handshake_s, request_deadline_s=1.0),
        on_connection_refused=note,
        maximum_associations=associations,
    )
    server = ArchiveServer(
        ArchiveConfig(tmp_path / "archive", port=0, allowed_callers=["CALLER"], network=network)
    )
    server.start()
    return server, refused


def _served(peer: Peer, within_s: float = 3.0) -> None:
    """A C-ECHO that gets through, retried as a device retries a transient refusal: a slot
    is held until the previous association's TCP connection is closed (DICOM's release
    ends with the requestor closing it), so back-to-back callers may briefly meet a full
    server; idle connections holding slots would refuse them for good."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            scu.echo("CALLER", peer, NetworkSettings())
            return
        except scu.DimseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_a_silent_tls_connection_blocks_nobody_and_is_closed(tmp_path, pki):  # noqa: F811
    site = TlsConfig(pki / "site.pem", pki / "site.key", pki / "ca.pem")
    caller = NetworkSettings(tls=TlsConfig(pki / "device.pem", pki / "device.key", pki / "ca.pem"))
    server, refused = _archive(tmp_path, NetworkSettings(tls=site), handshake_s=10.0)
    try:
        peer = Peer("ARCHIVE", *server.address)
        silent = socket.create_connection(server.address)  # no ClientHello, ever
        started = time.monotonic()
        scu.echo("CALLER", peer, caller)  # pynetdicom's accept thread would hang here
        assert time.monotonic() - started < 5.0  # well inside the 10 s the silent one gets
        assert _closed_within(silent, 12.0)
        # Counted by the connection's own thread, which may still be on its way.
        deadline = time.monotonic() + 5
        while "tls_handshake_timeout" not in refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "tls_handshake_timeout" in refused, refused
    finally:
        server.stop()


def test_idle_and_closed_connections_take_no_association_slot(tmp_path):
    server, refused = _archive(tmp_path, NetworkSettings())
    try:
        peer = Peer("ARCHIVE", *server.address)
        idle = [socket.create_connection(server.address) for _ in range(10)]
        for _ in range(3):
            socket.create_connection(server.address).close()
        # Two association slots in all, ten idle connections: callers are still served.
        for _ in range(5):
            _served(peer)
        assert all(_closed_within(sock, 3.0) for sock in idle)
        deadline = time.monotonic() + 3
        while refused.count("no_association_request") < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused.count("no_association_request") == 10
        assert refused.count("closed_by_peer") == 3
    finally:
        server.stop()


def test_finished_associations_go_without_pynetdicom_s_forced_collections(tmp_path):
    """The guarded server skips pynetdicom's per-server gc.collect(): association threads
    still end and their Association objects are still freed."""
    import gc
    import weakref

    # Room for the previous echoes' threads still ending (about 10 ms each, pynetdicom's
    # kill() loop): this test is about collections, not the association limit.
    server, _ = _archive(tmp_path, NetworkSettings(), associations=8)
    calls = []
    original = gc.collect
    gc.collect = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        peer = Peer("ARCHIVE", *server.address)
        for _ in range(20):
            scu.echo("CALLER", peer, NetworkSettings())
        listener = server._server
        deadline = time.monotonic() + 5
        while listener.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.active_associations == []
        seen = weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, Association))
        listener._gc[0] = listener._gc[1]  # stock pynetdicom collects at its next poll
        time.sleep(1.2)  # two polls of 0.5 s
        assert calls == []
    finally:
        gc.collect = original
        server.stop()
    original()  # what is still referenced after a collection is leaked, not merely late
    assert len(seen) == 0
