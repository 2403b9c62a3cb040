"""One Storage SCP for every emulated device in a process, routing by the called AE title.

A fleet of 200 devices with a receiver each is 200 listening sockets, 200 accept threads
and 200 servers polling their shutdown flags. One server serves them all: each device
*attaches* its AE title, its store and the callers it accepts (its TMS and Archive), and
an association is routed by the Called AE Title of its A-ASSOCIATE-RQ. An unknown called
AE is rejected with "called AE title not recognised" and a caller a device does not accept
with "calling AE title not recognised" (PS3.8 9.3.4), exactly as a receiver of its own
would; the accepted association answers with the device's AE title, so a peer cannot tell
the difference. The Archive's move destinations then all point at one host and port.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from emulator.net.ae_factory import NetworkSettings, make_ae
from emulator.net.event_scp import (
    EventCallback,
    UpsEventNotice,
    add_event_context,
    event_report_handler,
)
from emulator.net.peers import validate_ae_title
from emulator.net.rejection import CALLED_NOT_RECOGNISED, CALLING_NOT_RECOGNISED, reject
from emulator.net.served_ae import ServedAE
from emulator.net.storage_scp import add_storage_contexts, status_dataset, store_event
from emulator.store import AdmissionLimits, ObjectStore

SHARED_AE_TITLE = "TDWFLEET"


@dataclass
class _Route:
    store: ObjectStore
    allowed_callers: frozenset[str]
    on_ups_event: EventCallback | None = None


class SharedStorageReceiver(ServedAE):
    """The process's one receiver; :meth:`attach` gives each device its own inbox."""

    def __init__(
        self,
        sop_classes: list[str],
        host: str = "127.0.0.1",
        port: int = 0,
        settings: NetworkSettings | None = None,
        limits: AdmissionLimits | None = None,
        event_class: str = "",
    ) -> None:
        """``event_class``: the UPS Event SOP Class, to route N-EVENT-REPORTs too."""
        super().__init__()
        self.event_class = event_class
        self.sop_classes = sop_classes
        self.host = host
        self.port = port
        self.settings = settings or NetworkSettings()
        self.limits = limits or AdmissionLimits()
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()

    def attach(
        self,
        ae_title: str,
        data_dir: Path,
        allowed_callers: list[str],
        on_ups_event: EventCallback | None = None,
    ) -> ReceiverInbox:
        """Routes associations called ``ae_title`` into a store at ``data_dir`` (and its UPS
        events to ``on_ups_event``)."""
        title = validate_ae_title(ae_title)
        callers = frozenset(validate_ae_title(c) for c in allowed_callers)
        if not callers:
            raise ValueError("an empty allow-list would accept any caller")
        with self._lock:
            if title in self._routes:
                raise ValueError(f"{title} is already attached to this receiver")
            route = _Route(ObjectStore(Path(data_dir)), callers, on_ups_event)
            self._routes[title] = route
        return ReceiverInbox(self, title, route.store)

    def detach(self, ae_title: str) -> None:
        with self._lock:
            route = self._routes.pop(ae_title, None)
        if route is not None:
            route.store.close()

    @property
    def attached(self) -> list[str]:
        with self._lock:
            return sorted(self._routes)

    def _route(self, event: evt.Event) -> None:
        """EVT_REQUESTED: pick the device by the called AE title before negotiation."""
        request = event.assoc.requestor.primitive
        called = request.called_ae_title.strip()
        calling = request.calling_ae_title.strip()
        with self._lock:
            route = self._routes.get(called)
        if route is None:
            reject(event.assoc, CALLED_NOT_RECOGNISED)
        elif calling not in route.allowed_callers:
            reject(event.assoc, CALLING_NOT_RECOGNISED)
        else:
            # The A-ASSOCIATE-AC then carries the device's title, as its own receiver would.
            event.assoc.acceptor.ae_title = called

    def _store(self, event: evt.Event) -> Dataset:
        with self._lock:
            route = self._routes.get(event.assoc.acceptor.ae_title.strip())
        if route is None:  # detached while the association was open
            return status_dataset(0xA700, "the device has stopped")
        return store_event(event, route.store, self.limits)

    def _ups_event(self, notice: UpsEventNotice) -> None:
        with self._lock:
            route = self._routes.get(notice.to_ae)
        if route is not None and route.on_ups_event is not None:
            route.on_ups_event(notice)

    def build(self) -> tuple[AE, list]:
        ae = make_ae(SHARED_AE_TITLE, self.settings)
        ae.require_called_aet = False  # the router checks it against the attached titles
        add_storage_contexts(ae, self.sop_classes)
        handlers = [(evt.EVT_REQUESTED, self._route), (evt.EVT_C_STORE, self._store)]
        if self.event_class:
            add_event_context(ae, self.event_class)
            handlers.append((evt.EVT_N_EVENT_REPORT, event_report_handler(self._ups_event)))
        return ae, handlers

    def close_resources(self) -> None:
        for title in self.attached:
            self.detach(title)


class ReceiverInbox:
    """One device's view of the shared receiver: what a :class:`StorageReceiver` offers."""

    def __init__(self, receiver: SharedStorageReceiver, ae_title: str, store: ObjectStore):
        self.receiver = receiver
        self.ae_title = ae_title
        self.store = store

    def start(self) -> tuple[str, int]:
        """The shared server is started once, by its owner; the device only reads it."""
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        return self.receiver.address

    def stop(self) -> None:
        self.receiver.detach(self.ae_title)
