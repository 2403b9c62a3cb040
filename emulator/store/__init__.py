"""Durable object storage shared by the reference Archive and the performing devices."""

from emulator.store.admission import AdmissionError, AdmissionLimits, admit
from emulator.store.object_store import (
    INDEXED_KEYWORDS,
    DuplicatePolicy,
    ObjectStore,
    StoredInstance,
    StoreOutcome,
)

__all__ = [
    "INDEXED_KEYWORDS",
    "AdmissionError",
    "AdmissionLimits",
    "DuplicatePolicy",
    "ObjectStore",
    "StoreOutcome",
    "StoredInstance",
    "admit",
]
