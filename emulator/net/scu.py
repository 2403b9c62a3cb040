"""Typed SCU calls used by the CLI, the demo and the performing devices.

Each call opens its own association to one peer with exactly the contexts it needs and
raises :class:`DimseError` with the status when the peer says no, so callers never have
to remember to check a status by hand.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from emulator.net.ae_factory import NetworkSettings, association_handlers, make_ae, tls_args
from emulator.net.peers import Peer

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class DimseError(RuntimeError):
    """A peer refused the association or answered a request with a failure status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"{message} (status 0x{status:04X})")
        self.status = status


@dataclass
class MoveResult:
    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_instances: list[str] = field(default_factory=list)


@contextlib.contextmanager
def associate(
    calling_ae: str,
    peer: Peer,
    contexts: list,
    settings: NetworkSettings | None = None,
) -> Iterator[Association]:
    """An established association that is always released (or aborted) on exit."""
    ae: AE = make_ae(calling_ae, settings)
    ae.requested_contexts = contexts
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=association_handlers(settings),
        tls_args=tls_args(settings, peer.host),
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise AssociationRejected.of(assoc, calling_ae, peer)
        raise AssociationFailed.of(assoc, peer, settings)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


# PS3.8 Table 9-21: A-ASSOCIATE-RJ reasons of the service user (source 1), with the fix.
_USER_REJECTIONS = {
    2: "it does not support the application context",
    3: "it does not accept the calling AE title {calling}: the peer must know it (a "
    "reference TMS or Archive: --peer {calling}@HOST:PORT, or --allow {calling})",
    7: "its AE title is not {called}: give the AE title it answers to (AET@HOST:PORT)",
}


class AssociationRejected(DimseError):
    """The peer answered A-ASSOCIATE-RJ: a set-up problem, not an outage.

    A permanent rejection (PS3.8 9.3.4, result 1) will be the same on every attempt, so
    nothing retries it; a transient one (result 2, e.g. too many associations) may be.
    """

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent

    @classmethod
    def of(cls, assoc: Association, calling_ae: str, peer: Peer) -> AssociationRejected:
        rejection = assoc.acceptor.primitive
        result = int(getattr(rejection, "result", 0) or 0)
        source = int(getattr(rejection, "result_source", 0) or 0)
        reason = int(getattr(rejection, "diagnostic", 0) or 0)
        why = "it gave no reason it is known for"
        if source == 1 and reason in _USER_REJECTIONS:
            why = _USER_REJECTIONS[reason].format(calling=calling_ae, called=peer.ae_title)
        elif result == 2:
            why = "it is busy (too many associations); try again later"
        kind = "permanently" if result == 1 else "for now"
        return cls(f"{peer} rejected the association {kind}: {why}", permanent=result == 1)


class AssociationFailed(DimseError):
    """No association and no A-ASSOCIATE-RJ: nothing listens, the peer hung up (often a TLS
    mismatch), or it never answered. Says which, and what to check, in one sentence."""

    @classmethod
    def of(
        cls, assoc: Association, peer: Peer, settings: NetworkSettings | None = None
    ) -> AssociationFailed:
        tls = settings is not None and settings.tls is not None
        try:
            socket.create_connection((peer.host, peer.port), timeout=3).close()
        except OSError as exc:
            return cls(
                f"nothing accepts connections at {peer.host}:{peer.port} ({exc.strerror or exc}): "
                f"is {peer.ae_title} running there, on that port?"
            )
        refused = contexts_refused(assoc, peer)
        if refused:
            return ContextsRefused(refused)
        if assoc.is_aborted and tls:
            return cls(
                f"{peer} ended the TLS connection or the association at once: does it speak "
                "DICOM TLS, and does each side trust the other's certificate (--tls-ca)?"
            )
        if assoc.is_aborted:
            return cls(
                f"{peer} closed the connection without answering the association request: if "
                "it requires TLS, give --tls-cert, --tls-key and --tls-ca"
            )
        timeout = (settings or NetworkSettings()).acse_timeout
        return cls(
            f"{peer} accepted the connection but did not answer the association request "
            f"within {timeout:g} s: is it a DICOM server, and not TLS-only?"
        )


class ContextsRefused(AssociationFailed):
    """The peer answered the association request but accepted none of the presentation
    contexts proposed: a set-up problem (it does not offer that service), not an outage."""

    permanent = True


def contexts_refused(assoc: Association, peer: Peer, wanted: Iterable[str] = ()) -> str:
    """One sentence naming the presentation contexts ``peer`` refused and why (PS3.8 Table
    9-18), when none of ``wanted`` (default: none at all) was accepted; "" otherwise."""
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    wanted = {str(uid) for uid in wanted}
    if (wanted and accepted & wanted) or (not wanted and accepted):
        return ""
    rejected = [
        cx for cx in assoc.rejected_contexts if not wanted or str(cx.abstract_syntax) in wanted
    ]
    if not rejected:
        return ""
    named = "; ".join(
        f"{UID(str(cx.abstract_syntax)).name} ({str(cx.status or 'refused').lower()})"
        for cx in rejected
    )
    return f"{peer} accepted the association but refused the presentation context {named}"


def _status_of(rsp: Dataset | None, what: str) -> int:
    if rsp is None or "Status" not in rsp:
        raise DimseError(f"{what}: no response (timeout or aborted association)")
    return int(rsp.Status)


def echo(calling_ae: str, peer: Peer, settings: NetworkSettings | None = None) -> int:
    with associate(calling_ae, peer, [build_context(Verification)], settings) as assoc:
        return _status_of(assoc.send_c_echo(), "C-ECHO")


def store(
    calling_ae: str,
    peer: Peer,
    objects: Iterable[Dataset | Path],
    settings: NetworkSettings | None = None,
    on_stored: Callable[[Dataset], None] | None = None,
) -> list[int]:
    """C-STOREs each object; raises on the first failure so nothing is silently lost.

    ``on_stored`` is told of each object the peer acknowledged, as it happens, so a caller
    can tell what was taken when a later one fails.
    """
    datasets = [dcmread(o) if isinstance(o, str | Path) else o for o in objects]
    sop_classes = dict.fromkeys(ds.SOPClassUID for ds in datasets)
    contexts = [build_context(uid, UNCOMPRESSED) for uid in sop_classes]
    statuses = []
    with associate(calling_ae, peer, contexts, settings) as assoc:
        for ds in datasets:
            status = _status_of(assoc.send_c_store(ds), f"C-STORE {ds.SOPInstanceUID}")
            if status not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise DimseError(f"C-STORE {ds.SOPInstanceUID} refused", status)
            statuses.append(status)
            if on_stored is not None:
                on_stored(ds)
    return statuses


def find(
    calling_ae: str,
    peer: Peer,
    identifier: Dataset,
    model: str = StudyRootQueryRetrieveInformationModelFind,
    settings: NetworkSettings | None = None,
) -> list[Dataset]:
    """All pending identifiers of a C-FIND; raises unless the final status is success."""
    results = []
    with associate(calling_ae, peer, [build_context(model)], settings) as assoc:
        for status, found in assoc.send_c_find(identifier, model):
            code = _status_of(status, "C-FIND")
            if code in (0xFF00, 0xFF01):
                results.append(found)
            elif code == 0x0000:
                return results
            else:
                raise DimseError("C-FIND failed", code)
    raise DimseError("C-FIND ended without a final response")


def move(
    calling_ae: str,
    peer: Peer,
    identifier: Dataset,
    destination: str,
    settings: NetworkSettings | None = None,
) -> MoveResult:
    """A Study Root C-MOVE; returns the final counts, raising if the move itself failed."""
    model = StudyRootQueryRetrieveInformationModelMove
    final: MoveResult | None = None
    with associate(calling_ae, peer, [build_context(model)], settings) as assoc:
        for status, found in assoc.send_c_move(identifier, destination, model):
            code = _status_of(status, "C-MOVE")
            if code == 0xFF00:
                continue
            final = MoveResult(
                code,
                int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                int(status.get("NumberOfFailedSuboperations", 0) or 0),
                int(status.get("NumberOfWarningSuboperations", 0) or 0),
                list(found.get("FailedSOPInstanceUIDList", []) or []) if found else [],
            )
    if final is None:
        raise DimseError("C-MOVE ended without a final response")
    if final.status not in (0x0000, 0xB000):
        raise DimseError("C-MOVE failed", final.status)
    return final
