"""A Storage SCP that receives C-MOVE sub-operations into an :class:`ObjectStore`.

The performing devices (and the demo) use it as the Move Destination of RO-18 and RO-20.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import Verification

from emulator.net.ae_factory import NetworkSettings, make_ae, start_server
from emulator.net.storage_scp import store_event
from emulator.store import AdmissionLimits, ObjectStore


class StorageReceiver:
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
        self.store = ObjectStore(Path(data_dir))
        self.ae_title = ae_title
        self.sop_classes = sop_classes
        self.allowed_callers = allowed_callers
        self.host = host
        self.port = port
        self.settings = settings or NetworkSettings()
        self.limits = limits or AdmissionLimits()
        self._server = None

    def start(self) -> tuple[str, int]:
        ae = make_ae(self.ae_title, self.settings, self.allowed_callers)
        ae.add_supported_context(Verification)
        for uid in self.sop_classes:
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handler = (evt.EVT_C_STORE, lambda event: store_event(event, self.store, self.limits))
        self._server = start_server(ae, self.host, self.port, [handler], self.settings)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("receiver not started")
        return self._server.server_address[:2]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.store.close()

    def __enter__(self) -> StorageReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
