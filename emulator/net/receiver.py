"""A Storage SCP that receives C-MOVE sub-operations into an :class:`ObjectStore`.

The performing devices (and the demo) use it as the Move Destination of RO-18 and RO-20,
and, given ``events``, as the receiver of the UPS events they subscribed to.
"""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE, evt

from emulator.net.ae_factory import NetworkSettings, make_ae
from emulator.net.event_scp import EventCallback, add_event_context, event_report_handler
from emulator.net.served_ae import ServedAE
from emulator.net.storage_scp import add_storage_contexts, store_event
from emulator.store import AdmissionLimits, ObjectStore


class StorageReceiver(ServedAE):
    """Accepts only the SOP classes it is given, from the callers it is given."""

    def __init__(
        self,
        data_dir: Path,
        ae_title: str,
        sop_classes: list[str],
        allowed_callers: list[str] | None,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: NetworkSettings | None = None,
        limits: AdmissionLimits | None = None,
        events: tuple[str, EventCallback] | None = None,
    ) -> None:
        """``events``: (UPS Event SOP Class UID, callback) to take N-EVENT-REPORTs too."""
        super().__init__()
        self.events = events
        self.store = ObjectStore(Path(data_dir))
        self.ae_title = ae_title
        self.sop_classes = sop_classes
        self.allowed_callers = allowed_callers
        self.host = host
        self.port = port
        self.settings = settings or NetworkSettings()
        self.limits = limits or AdmissionLimits()

    def build(self) -> tuple[AE, list]:
        ae = make_ae(self.ae_title, self.settings, self.allowed_callers)
        add_storage_contexts(ae, self.sop_classes)
        handlers = [(evt.EVT_C_STORE, lambda event: store_event(event, self.store, self.limits))]
        if self.events is not None:
            event_class, callback = self.events
            add_event_context(ae, event_class)
            handlers.append((evt.EVT_N_EVENT_REPORT, event_report_handler(callback)))
        return ae, handlers

    def close_resources(self) -> None:
        self.store.close()
