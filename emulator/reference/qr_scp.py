"""Study Root C-FIND and C-MOVE handlers over one store, for the Archive and the TMS.

The Archive serves RO-18 with it and the TMS serves RO-20 (its transient instructions and
records) with it: same matching, same refusal of unknown destinations, same sub-association
set-up with TCP_NODELAY and exactly the contexts the matched instances need.
"""

from __future__ import annotations

import logging

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import Verification

from emulator.net.ae_factory import NetworkSettings, association_handlers, tls_args
from emulator.net.peers import PeerDirectory
from emulator.net.storage_scp import status_dataset
from emulator.net.stored_file_sender import SUB_ASSOCIATION_HANDLERS, StoredFileReference
from emulator.reference.qr_query import QueryError, StudyRootQuery
from emulator.store import StoredInstance

LOG = logging.getLogger("tdw.qr")
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00


class QueryRetrieveSCP:
    def __init__(
        self, query: StudyRootQuery, peers: PeerDirectory, settings: NetworkSettings | None = None
    ) -> None:
        self.query = query
        self.peers = peers
        self.settings = settings or NetworkSettings()

    def on_find(self, event: evt.Event):
        try:
            for response in self.query.find(event.identifier):
                if event.is_cancelled:
                    yield STATUS_CANCEL, None
                    return
                yield STATUS_PENDING, response
        except QueryError as exc:
            LOG.warning("C-FIND refused (0x%04X): %s", exc.status, exc.comment)
            yield status_dataset(exc.status, exc.comment), None
            return
        yield 0x0000, None

    @staticmethod
    def move_contexts(instances: list[StoredInstance]) -> list:
        contexts = []
        for sop_class in dict.fromkeys(i.sop_class_uid for i in instances):
            stored = [i.transfer_syntax_uid for i in instances if i.sop_class_uid == sop_class]
            syntaxes = list(dict.fromkeys([*stored, *TRANSFER_SYNTAXES]))
            contexts.append(build_context(sop_class, syntaxes))
        return contexts[:128]

    def on_move(self, event: evt.Event):
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
                "contexts": self.move_contexts(instances) or None,
                # The sub-association is opened by pynetdicom: give it TCP_NODELAY, the
                # observers and TLS as every association of ours, and let it send the
                # stored files as they are.
                "evt_handlers": [*association_handlers(self.settings), *SUB_ASSOCIATION_HANDLERS],
                "tls_args": tls_args(self.settings, peer.host),
            },
        )
        yield len(instances)
        store = self.query.store
        for instance in instances:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield (
                STATUS_PENDING,
                StoredFileReference(
                    store.path_for(instance.sha256),
                    instance.sop_class_uid,
                    instance.sop_instance_uid,
                    instance.transfer_syntax_uid,
                ),
            )
