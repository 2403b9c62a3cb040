"""C-STORE handling shared by the Archive and by a device's own receiver for C-MOVE results.

Both must refuse malformed objects with a reason and acknowledge only what is durable, so
both go through the same admission check and the same :class:`ObjectStore`.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from emulator.store import AdmissionError, AdmissionLimits, ObjectStore, admit

LOG = logging.getLogger("tdw.storage")
# What every Storage SCP here accepts: the stored files are kept as received, uncompressed.
STORAGE_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def add_storage_contexts(ae: AE, sop_classes: list[str]) -> None:
    """Verification plus each storage SOP class, in the transfer syntaxes stored here."""
    ae.add_supported_context(Verification)
    for uid in sop_classes:
        ae.add_supported_context(uid, STORAGE_TRANSFER_SYNTAXES)


def status_dataset(code: int, comment: str = "") -> Dataset:
    """A DIMSE status, with an Error Comment when there is something to say."""
    status = Dataset()
    status.Status = code
    if comment and code:
        # LO, one value: a backslash would split it in two (PS3.5 6.2).
        status.ErrorComment = comment.replace("\\", "/")[:64]
    return status


def store_event(event: evt.Event, store: ObjectStore, limits: AdmissionLimits) -> Dataset:
    """Admits and stores one C-STORE request; returns the response status."""
    calling = event.assoc.requestor.ae_title
    try:
        encoded = event.encoded_dataset(include_meta=True)
        header = admit(
            encoded,
            expected_sop_class=event.context.abstract_syntax,
            expected_sop_instance=event.request.AffectedSOPInstanceUID,
            limits=limits,
        )
    except AdmissionError as exc:
        LOG.warning("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc.comment)
        return status_dataset(exc.status, exc.comment)
    outcome = store.put(encoded, header, calling_ae=calling)
    LOG.info(
        "C-STORE from %s %s: 0x%04X %s",
        calling,
        header.SOPInstanceUID,
        outcome.status,
        outcome.comment,
    )
    return status_dataset(outcome.status, outcome.comment)
