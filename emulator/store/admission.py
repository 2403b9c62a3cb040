"""Checks an incoming object before it is stored, so bad input is refused with a reason.

A store that indexes a malformed UID or a 10 kB Patient ID would corrupt every later query
and move. These checks run before anything touches the disk; each failure carries the
C-STORE status to answer with and a comment short enough for Error Comment (LO, 64 chars).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import validate_value

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# Attributes the index and the Q/R matching depend on: their values must be valid for their VR.
IDENTIFYING = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
)
# Values kept as received: opaque bytes, and text that pydicom decodes without raising
# (bad characters are replaced with a warning). Numbers (binary, DS, IS), tags and
# sequences are converted, as those are what raises on a corrupt value.
UNCONVERTED_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
    | {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class AdmissionError(Exception):
    """An object was refused; ``status`` is the C-STORE failure status to send."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


@dataclass(frozen=True)
class AdmissionLimits:
    """Size limits: a peer may not make the Archive hold arbitrarily large objects."""

    max_dataset_bytes: int = 1 << 31
    max_element_bytes: int = 1 << 30


def _refuse_unindexable(ds: Dataset) -> None:
    """Values the index cannot hold as the standard means them are refused, not mangled:
    several values in an attribute whose VM is 1 (a multi-valued Patient ID was indexed as a
    Python list, found by no value), and control characters (a NUL) in text (docs/archive.md)."""
    from emulator.store.object_store import INDEXED_KEYWORDS

    for keyword in INDEXED_KEYWORDS:
        if keyword not in ds:
            continue
        element = ds[keyword]
        if element.VM > 1 and dictionary_VM(element.tag) == "1":
            raise AdmissionError(
                STATUS_DATASET_MISMATCH, f"{keyword} holds {element.VM} values; its VM is 1"
            )
        text = str(element.value or "")
        if any(ord(c) < 0x20 and c != "\x1b" for c in text):
            raise AdmissionError(STATUS_DATASET_MISMATCH, f"control character in {keyword}")


def admit(
    encoded: bytes,
    expected_sop_class: str | None = None,
    expected_sop_instance: str | None = None,
    limits: AdmissionLimits | None = None,
) -> Dataset:
    """Parses Part 10 bytes and returns the header if the object may be stored.

    Raises :class:`AdmissionError` with the status and reason otherwise.
    """
    limits = limits or AdmissionLimits()
    if len(encoded) > limits.max_dataset_bytes:
        raise AdmissionError(
            STATUS_OUT_OF_RESOURCES,
            f"dataset of {len(encoded)} bytes exceeds {limits.max_dataset_bytes}",
        )
    try:
        ds = dcmread(io.BytesIO(encoded), force=False)
        # Convert the top-level elements whose decoding can raise (numbers, tags,
        # sequences) so a corrupt value fails here, not in whoever reads the object later.
        # Text and bulk bytes are only measured: pydicom decodes them without raising, and
        # converting them was most of the admission time of a CT slice.
        for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
            raw = ds.get_item(tag)
            if raw.VR not in UNCONVERTED_VRS:
                raw = ds[tag]
            value = raw.value
            length = len(value) if isinstance(value, bytes | str) else 0
            if raw.VR != "SQ" and length > limits.max_element_bytes:
                raise AdmissionError(
                    STATUS_OUT_OF_RESOURCES, f"element {raw.tag} of {length} bytes is too large"
                )
    except AdmissionError:
        raise
    except Exception as exc:
        # Untrusted bytes: pydicom raises many types (InvalidDicomError, EOFError, its own
        # BytesLengthException, ...); found by tests/test_fuzz.py. Any of them means the
        # object cannot be understood, never a crash of the SCP.
        raise AdmissionError(STATUS_CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}") from exc

    for keyword in REQUIRED:
        if not str(ds.get(keyword, "") or "").strip():
            raise AdmissionError(STATUS_DATASET_MISMATCH, f"missing {keyword}")
    for keyword in IDENTIFYING:
        if keyword not in ds:
            continue
        element = ds[keyword]
        value = element.value
        if value is None or value == "":
            continue
        try:
            values = value if element.VM > 1 else [value]
            for single in values:
                validate_value(element.VR, str(single), pydicom_config.RAISE)
        except (ValueError, TypeError) as exc:
            raise AdmissionError(STATUS_DATASET_MISMATCH, f"invalid {keyword}: {exc}") from exc
    _refuse_unindexable(ds)
    for keyword in REQUIRED:
        if keyword.endswith("UID") and not UID(str(ds[keyword].value)).is_valid:
            raise AdmissionError(STATUS_DATASET_MISMATCH, f"invalid UID in {keyword}")
    if expected_sop_class and ds.SOPClassUID != expected_sop_class:
        raise AdmissionError(
            STATUS_DATASET_MISMATCH,
            f"SOP Class {ds.SOPClassUID} does not match the context",
        )
    if expected_sop_instance and ds.SOPInstanceUID != expected_sop_instance:
        raise AdmissionError(
            STATUS_DATASET_MISMATCH, "SOP Instance UID differs from the C-STORE request"
        )
    return ds
