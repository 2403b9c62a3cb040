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
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from emulator.net.ae_factory import NODELAY_HANDLER, NetworkSettings, make_ae
from emulator.net.peers import Peer, PeerDirectory
from emulator.net.served_ae import ServedAE
from emulator.net.storage_scp import status_dataset, store_event
from emulator.profile import DEFAULT_UID_SET, load_sop_classes
from emulator.reference.qr_query import QueryError, StudyRootQuery
from emulator.store import AdmissionLimits, DuplicatePolicy, ObjectStore, StoredInstance

LOG = logging.getLogger("tdw.archive")
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00


class ArchiveConfigError(ValueError):
    """The Archive configuration cannot be served safely."""


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
        if self.accept_any_ae:
            return None
        titles = list(dict.fromkeys([*(p.ae_title for p in self.peers), *self.allowed_callers]))
        if not titles:
            raise ArchiveConfigError(
                "no caller would be accepted: configure --peer or --allow, or --accept-any-ae"
            )
        return titles


class ArchiveServer(ServedAE):
    """One Archive AE; start() binds (port 0 picks a free port) and returns at once."""

    def __init__(self, config: ArchiveConfig) -> None:
        super().__init__()
        self.config = config
        self.host, self.port, self.settings = config.host, config.port, config.network
        self.peers = PeerDirectory(config.peers)
        self.sop_classes = load_sop_classes(config.uid_set)
        self.store = ObjectStore(Path(config.data_dir), config.duplicate_policy)
        self.query = StudyRootQuery(self.store, config.ae_title)
        self.storage_uids = self.sop_classes.archive_storage_uids()

    def build(self) -> tuple[AE, list]:
        ae = make_ae(self.config.ae_title, self.config.network, self.config.calling_allow_list())
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        for uid in self.storage_uids:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
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

    def _on_find(self, event: evt.Event):
        try:
            matches = self.query.find(event.identifier)
            for response in matches:
                if event.is_cancelled:
                    yield STATUS_CANCEL, None
                    return
                yield STATUS_PENDING, response
        except QueryError as exc:
            LOG.warning("C-FIND refused (0x%04X): %s", exc.status, exc.comment)
            yield status_dataset(exc.status, exc.comment), None
            return
        yield 0x0000, None

    def _move_contexts(self, instances: list[StoredInstance]) -> list:
        contexts = []
        for sop_class in dict.fromkeys(i.sop_class_uid for i in instances):
            syntaxes = list(
                dict.fromkeys(
                    [
                        *(i.transfer_syntax_uid for i in instances if i.sop_class_uid == sop_class),
                        *TRANSFER_SYNTAXES,
                    ]
                )
            )
            contexts.append(build_context(sop_class, syntaxes))
        return contexts[:128]

    def _on_move(self, event: evt.Event):
        destination = event.move_destination
        destination = (
            destination.decode("ascii", "replace")
            if isinstance(destination, bytes)
            else str(destination)
        ).strip()
        peer = self.peers.get(destination)
        if peer is None:
            LOG.warning("C-MOVE to unknown destination %r refused", destination)
            yield None, None
            return
        try:
            instances = self.query.instances(event.identifier)
        except QueryError as exc:
            LOG.warning("C-MOVE refused (0x%04X): %s", exc.status, exc.comment)
            # pynetdicom wants a destination and a count before any status.
            yield peer.host, peer.port, {"contexts": [build_context(Verification)]}
            yield 1
            yield status_dataset(exc.status, exc.comment), None
            return
        yield (
            peer.host,
            peer.port,
            {
                "contexts": self._move_contexts(instances) or None,
                # The sub-association is opened by pynetdicom: give it TCP_NODELAY too.
                "evt_handlers": [NODELAY_HANDLER],
            },
        )
        yield len(instances)
        for instance in instances:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, self.store.read(instance)
