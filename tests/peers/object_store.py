"""An in-memory Storage SCP and Study Root C-MOVE SCP (PS3.4 Annex B and Annex C).

It lets the peer TMS serve the objects a UPS references (Input Information Sequence) by
C-MOVE, as a TMS/OST does in IHE-RO TDW-II RO-59/RO-61. Matching is by list of UIDs
(PS3.4 C.2.2.2.2) on Study/Series/SOP Instance UID; the level is taken from Query/Retrieve
Level (STUDY, SERIES or IMAGE). Move destinations come from the shared
``{ae_title: (host, port)}`` map; an unknown destination gets A801H (PS3.4 C.4.2.1.5).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt

_LEVEL_KEYS = {
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


@dataclass(frozen=True)
class MoveRecord:
    destination: str
    identifier: Dataset
    sop_instance_uids: tuple[str, ...]
    calling_ae: str
    time: float


class ObjectStore:
    """Objects kept by SOP Instance UID; handlers for C-STORE and C-MOVE."""

    def __init__(self, destinations: dict[str, tuple[str, int]]) -> None:
        self.destinations = destinations
        self.objects: dict[str, Dataset] = {}
        self.moves: list[MoveRecord] = []
        self._lock = threading.Lock()

    def add(self, ds: Dataset) -> None:
        """Keep ``ds`` as if it had been stored; it must carry SOP Class/Instance UIDs."""
        if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            ds.ensure_file_meta()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        with self._lock:
            self.objects[str(ds.SOPInstanceUID)] = ds

    def on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.add(ds)
        return 0x0000

    def _select(self, identifier: Dataset) -> list[Dataset] | None:
        level = str(identifier.get("QueryRetrieveLevel", "")).upper()
        keys = _LEVEL_KEYS.get(level)
        if keys is None:
            return None
        with self._lock:
            candidates = list(self.objects.values())
        for keyword in keys:
            wanted = identifier.get(keyword)
            if wanted is None or wanted == "":
                continue
            values = {str(v) for v in wanted} if isinstance(wanted, MultiValue) else {str(wanted)}
            candidates = [ds for ds in candidates if str(ds.get(keyword, "")) in values]
        return candidates

    def on_move(self, event: evt.Event):
        identifier = event.identifier
        destination = str(event.move_destination).strip()
        address = self.destinations.get(destination)
        selected = self._select(identifier)
        if address is None:
            yield None, None
            return
        if selected is None:  # no or unknown Query/Retrieve Level
            yield address[0], address[1]
            yield 1
            yield 0xA900, None
            return
        self.moves.append(
            MoveRecord(
                destination,
                identifier,
                tuple(str(ds.SOPInstanceUID) for ds in selected),
                str(event.assoc.requestor.ae_title),
                time.monotonic(),
            )
        )
        contexts = {}
        for ds in selected:
            ts = ds.file_meta.TransferSyntaxUID
            syntaxes = (
                [ts] if ts.is_compressed else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
            contexts.setdefault(str(ds.SOPClassUID), syntaxes)
        requested = [build_context(uid, ts) for uid, ts in list(contexts.items())[:128]]
        yield address[0], address[1], {"contexts": requested}
        yield len(selected)
        for ds in selected:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds
