"""A Storage SCP that receives C-MOVE sub-operations into an :class:`ObjectStore`.

The performing devices (and the demo) use it as the Move Destination of RO-18 and RO-20.
"""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE, evt

from emulator.net.ae_factory import NetworkSettings, make_ae
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
    ) -> None:
        super().__init__()
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
        handler = (evt.EVT_C_STORE, lambda event: store_event(event, self.store, self.limits))
        return ae, [handler]

    def close_resources(self) -> None:
        self.store.close()
