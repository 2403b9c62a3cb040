"""The reference Archive: Storage SCP and Study Root FIND/MOVE SCP on a durable store.

It answers RO-18 (input retrieval) and RO-22 to RO-24 (result storage) for the performing
devices, and stores the planning objects of RO-1 to RO-12. It is strict: unknown callers
are refused at association, unknown SOP classes are not negotiated, malformed objects
are refused with a reason, and nothing is acknowledged before it is on disk and indexed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from emulator.metrics import Metrics, default_metrics
from emulator.net.ae_factory import NetworkSettings, make_ae
from emulator.net.peers import Peer, PeerDirectory, calling_allow_list
from emulator.net.served_ae import ServedAE
from emulator.net.storage_scp import add_storage_contexts, store_event
from emulator.net.uid_registry import register_uid_set
from emulator.profile import DEFAULT_UID_SET, load_sop_classes
from emulator.reference.qr_query import StudyRootQuery
from emulator.reference.qr_scp import QueryRetrieveSCP
from emulator.store import AdmissionLimits, DuplicatePolicy, ObjectStore

LOG = logging.getLogger("tdw.archive")
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00


@dataclass
class ArchiveConfig:
    """What ``tdw-emu archive`` flags and its YAML config set."""

    data_dir: Path
    ae_title: str = "ARCHIVE"
    host: str = "127.0.0.1"
    port: int = 11112
    peers: list[Peer] = field(default_factory=list)
    allowed_callers: list[str] = field(default_factory=list)
    accept_any_ae: bool = False
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
    uid_set: str = DEFAULT_UID_SET
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    network: NetworkSettings = field(default_factory=NetworkSettings)

    def calling_allow_list(self) -> list[str] | None:
        """Callers to accept; None means any (only with ``accept_any_ae``)."""
        return calling_allow_list(self.peers, self.allowed_callers, self.accept_any_ae)


class ArchiveServer(ServedAE):
    """One Archive AE; start() binds (port 0 picks a free port) and returns at once."""

    def __init__(self, config: ArchiveConfig, metrics: Metrics | None = None) -> None:
        super().__init__()
        self.config = config
        (metrics or default_metrics()).add_actor(config.ae_title, "archive")
        self.host, self.port, self.settings = config.host, config.port, config.network
        self.peers = PeerDirectory(config.peers)
        self.sop_classes = load_sop_classes(config.uid_set)
        register_uid_set(self.sop_classes)
        self.store = ObjectStore(Path(config.data_dir), config.duplicate_policy)
        self.query = StudyRootQuery(self.store, config.ae_title)
        self.qr = QueryRetrieveSCP(self.query, self.peers, config.network)
        self.storage_uids = self.sop_classes.archive_storage_uids()

    def build(self) -> tuple[AE, list]:
        ae = make_ae(self.config.ae_title, self.config.network, self.config.calling_allow_list())
        add_storage_contexts(ae, self.storage_uids)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self.qr.on_find),
            (evt.EVT_C_MOVE, self.qr.on_move),
        ]
        return ae, handlers

    def start(self) -> tuple[str, int]:
        host, port = super().start()
        LOG.info("archive %s listening on %s:%s", self.config.ae_title, host, port)
        return host, port

    def close_resources(self) -> None:
        self.store.close()

    # -- handlers --------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset:
        return store_event(event, self.store, self.config.limits)
