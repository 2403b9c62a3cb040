"""Builds pynetdicom AEs the same way for every actor: timeouts, PDU size, TCP_NODELAY, allow-list.

Loopback DICOM without TCP_NODELAY stalls on Nagle plus delayed ACK (about 45 ms per
object, measured in shared/spec-notes.md), so every association socket gets it, on both
the requesting and the accepting side, through the connection-open event.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pynetdicom import AE, evt
from pynetdicom.transport import AssociationServer

from emulator.net.connection_guard import AdmissionLimits, GuardedAssociationServer
from emulator.net.peers import is_pattern, validate_ae_title
from emulator.net.rejection import calling_pattern_check
from emulator.net.tls import TlsConfig


@dataclass(frozen=True)
class NetworkSettings:
    """Association parameters common to all actors."""

    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    connection_timeout: float | None = 10.0
    maximum_pdu_size: int = 256 * 1024
    maximum_associations: int = 32
    tls: TlsConfig | None = None
    # Extra (event, handler) pairs bound to every association, e.g. the conformance
    # traffic recorder; they only observe, so the exchanges are the same with or without.
    observers: tuple = ()
    # pynetdicom's DUL thread polls its socket, sleeping this long when idle (its default
    # is 1 ms). With dozens of associations open in one process (a soak run) the polling
    # alone contends for the GIL; a few ms frees it at the cost of that much latency on
    # an idle association (pynetdicom issue #650). None keeps pynetdicom's default.
    reactor_poll_s: float | None = None
    # Admission before association (emulator/net/connection_guard.py): the TLS handshake
    # and the A-ASSOCIATE-RQ each within a deadline, a cap on connections waiting for it.
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    # Told (AE title, reason) of every connection refused before it became an association.
    on_connection_refused: Callable[[str, str], None] | None = None
    # A requested association is kept this long after an exchange for the next one of the
    # same burst (emulator/net/association_hold.py); 0 opens one per exchange.
    association_hold_s: float = 0.25


def _set_nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)


def _poll_handler(seconds: float):
    def set_poll(event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = seconds

    return (evt.EVT_CONN_OPEN, set_poll)


def tls_args(settings: NetworkSettings | None, host: str):
    """pynetdicom's ``tls_args`` for a requested association, or None without TLS."""
    return settings.tls.client_args(host) if settings and settings.tls else None


def association_handlers(settings: NetworkSettings | None) -> list:
    """TCP_NODELAY plus the settings' observers, for requested and accepted associations."""
    handlers = [NODELAY_HANDLER, *(settings.observers if settings else ())]
    if settings is not None and settings.reactor_poll_s is not None:
        handlers.append(_poll_handler(settings.reactor_poll_s))
    return handlers


def make_ae(
    ae_title: str,
    settings: NetworkSettings | None = None,
    allowed_calling_aets: Iterable[str] | None = None,
) -> AE:
    """An AE with the project's network settings; ``allowed_calling_aets`` None accepts any."""
    settings = settings or NetworkSettings()
    ae = AE(ae_title=validate_ae_title(ae_title))
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = settings.connection_timeout
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.maximum_associations = settings.maximum_associations
    # An association addressed to another AE is refused (A-ASSOCIATE-RJ, "called AE title
    # not recognised"), as a TMS or Archive on a shared host must: pynetdicom accepts any.
    ae.require_called_aet = True
    if allowed_calling_aets is not None:
        titles = [validate_ae_title(t) for t in allowed_calling_aets]
        if not titles:
            # pynetdicom reads an empty allow-list as "accept any": refuse to build that.
            raise ValueError("an empty allow-list would accept any caller; pass None for that")
        patterns = tuple(t for t in titles if is_pattern(t))
        if patterns:
            # pynetdicom matches exact titles only; start_server() checks patterns instead.
            ae.tdw_calling_patterns = tuple(titles)
        else:
            ae.require_calling_aet = titles
    return ae


class PortUnavailable(ValueError):
    """A server could not listen where it was told: a set-up problem, said in one sentence
    that names the address (the command exits 2)."""

    def __init__(self, ae_title: str, host: str, port: int, cause: OSError) -> None:
        if cause.errno == errno.EADDRINUSE:
            why = "is already in use (another server, or an earlier run still stopping)"
        elif cause.errno == errno.EACCES:
            why = "needs privileges to bind (ports below 1024)"
        else:
            why = f"cannot be bound ({cause.strerror or cause})"
        super().__init__(
            f"{ae_title} cannot listen on {host}:{port}: the port {why}; choose another "
            "port, or 0 for a free one"
        )


def start_server(
    ae: AE,
    host: str,
    port: int,
    handlers: list,
    settings: NetworkSettings | None = None,
) -> AssociationServer:
    """Starts a non-blocking server; port 0 binds a free port (see ``server.server_address``)."""
    settings = settings or NetworkSettings()
    patterns = getattr(ae, "tdw_calling_patterns", ())
    checks = [calling_pattern_check(patterns)] if patterns else []
    try:
        server = ae.make_server(
            (host, port),
            evt_handlers=[*checks, *association_handlers(settings), *handlers],
            ssl_context=settings.tls.server_context() if settings.tls else None,
            server_class=GuardedAssociationServer,
        )
    except OSError as exc:
        raise PortUnavailable(ae.ae_title, host, port, exc) from exc
    server.limits = settings.admission
    report = settings.on_connection_refused
    if report is not None:
        title = ae.ae_title
        server.on_refused = lambda reason: report(title, reason)
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{host}:{port}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # as AE.start_server does, so ae.shutdown() stops it
    return server
