"""Lifecycle shared by every AE that serves associations (Archive, receivers, later the TMS).

Subclasses say how to build their AE and handlers; this class binds (port 0 picks a free
port), reports the bound address, and shuts down and closes its store exactly once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pynetdicom import AE
from pynetdicom.transport import AssociationServer

from emulator.net.ae_factory import NetworkSettings, start_server


class ServedAE(ABC):
    """Start, address, stop and context management around one non-blocking server."""

    host: str
    port: int
    settings: NetworkSettings

    def __init__(self) -> None:
        self._server: AssociationServer | None = None

    @abstractmethod
    def build(self) -> tuple[AE, list]:
        """The AE with its supported contexts, and the event handlers to bind."""

    @abstractmethod
    def close_resources(self) -> None:
        """Releases what the subclass holds (its store) after the server stopped."""

    def start(self) -> tuple[str, int]:
        ae, handlers = self.build()
        self._server = start_server(ae, self.host, self.port, handlers, self.settings)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._server.server_address[:2]

    @property
    def open_associations(self) -> int:
        """Associations in progress now: a console, and a test waiting for a peer's end."""
        if self._server is None:
            return 0
        return sum(1 for a in self._server.active_associations if a.is_alive())

    def stop_listening(self) -> None:
        """Closes the port but keeps the store open: an outage, which ``start()`` ends."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def stop(self) -> None:
        self.stop_listening()
        self.close_resources()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
