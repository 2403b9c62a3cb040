"""SQLite index plus content-addressed files: a store is durable before it is acknowledged.

Order of a put: write the bytes to a temporary file, fsync, rename to the name of their
SHA-256 (never a name from the peer), fsync the directory, then commit the index row with
``synchronous=FULL``. Only then does the caller answer the C-STORE. A crash at any point
leaves either no trace in the index or a complete, readable object.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from emulator.store.sqlite import open_database

STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111

# DICOM keyword -> (index column, VR, Q/R level). The level says where a key may match.
INDEXED_KEYWORDS: dict[str, tuple[str, str, str]] = {
    "PatientID": ("patient_id", "LO", "STUDY"),
    "PatientName": ("patient_name", "PN", "STUDY"),
    "PatientBirthDate": ("patient_birth_date", "DA", "STUDY"),
    "PatientSex": ("patient_sex", "CS", "STUDY"),
    "StudyInstanceUID": ("study_instance_uid", "UI", "STUDY"),
    "StudyDate": ("study_date", "DA", "STUDY"),
    "StudyTime": ("study_time", "TM", "STUDY"),
    "StudyID": ("study_id", "SH", "STUDY"),
    "AccessionNumber": ("accession_number", "SH", "STUDY"),
    "StudyDescription": ("study_description", "LO", "STUDY"),
    "ReferringPhysicianName": ("referring_physician_name", "PN", "STUDY"),
    "SeriesInstanceUID": ("series_instance_uid", "UI", "SERIES"),
    "Modality": ("modality", "CS", "SERIES"),
    "SeriesNumber": ("series_number", "IS", "SERIES"),
    "SeriesDescription": ("series_description", "LO", "SERIES"),
    "SOPInstanceUID": ("sop_instance_uid", "UI", "IMAGE"),
    "SOPClassUID": ("sop_class_uid", "UI", "IMAGE"),
    "InstanceNumber": ("instance_number", "IS", "IMAGE"),
}
_COLUMNS = [column for column, _, _ in INDEXED_KEYWORDS.values()]
_BOOK_KEEPING = ["sha256", "size", "transfer_syntax_uid", "received_at", "calling_ae"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS instances (
    {", ".join(f"{c} TEXT NOT NULL DEFAULT ''" for c in _COLUMNS)},
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    received_at TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_patient ON instances (patient_id);
CREATE TABLE IF NOT EXISTS superseded (
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    superseded_at TEXT NOT NULL
);
"""


class DuplicatePolicy(str, enum.Enum):
    """What a second store of an existing SOP Instance UID does.

    Both policies accept a byte-identical resend as success, so a sender that retries after
    a dropped association never sees a failure for data the Archive already holds.

    * ``reject``: different content under the same UID is refused with 0111 (Duplicate
      SOP Instance) and the first object stays. Nothing acknowledged is ever replaced.
    * ``replace``: the new content becomes current; the old file stays on disk and is
      listed in the ``superseded`` table, so nothing is lost either.
    """

    REJECT = "reject"
    REPLACE = "replace"


@dataclass(frozen=True)
class StoredInstance:
    """One index row: identifying attributes plus where the bytes live."""

    values: dict[str, str]
    sha256: str
    size: int
    transfer_syntax_uid: str

    @property
    def sop_instance_uid(self) -> str:
        return self.values["sop_instance_uid"]

    @property
    def sop_class_uid(self) -> str:
        return self.values["sop_class_uid"]


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""
    duplicate: bool = False


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


class ObjectStore:
    """The Archive's and the devices' durable DICOM storage under one directory."""

    def __init__(self, root: Path, duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT):
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.duplicate_policy = DuplicatePolicy(duplicate_policy)
        self._lock = threading.RLock()
        self._made_dirs: set[Path] = set()
        self._db = open_database(self.root / "index.sqlite3", _SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------

    def path_for(self, sha256: str) -> Path:
        """Where the object with this content hash lives; the name is ours, never the peer's."""
        return self.objects_dir / sha256[:2] / f"{sha256}.dcm"

    def _write_durably(self, encoded: bytes, sha256: str) -> Path:
        final = self.path_for(sha256)
        if final.exists():
            return final
        if final.parent not in self._made_dirs:
            # 256 fan-out directories at most: made once, not stat'ed again per object.
            final.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(final.parent)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def put(self, encoded: bytes, header: Dataset, calling_ae: str = "") -> StoreOutcome:
        """Stores Part 10 bytes whose parsed ``header`` has passed admission."""
        sha256 = hashlib.sha256(encoded).hexdigest()
        values = {column: _text(header, kw) for kw, (column, _, _) in INDEXED_KEYWORDS.items()}
        transfer_syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            existing = self._db.execute(
                "SELECT sha256 FROM instances WHERE sop_instance_uid = ?",
                (values["sop_instance_uid"],),
            ).fetchone()
            if existing and existing[0] == sha256:
                return StoreOutcome(STATUS_SUCCESS, "identical instance already stored", True)
            if existing and self.duplicate_policy is DuplicatePolicy.REJECT:
                return StoreOutcome(
                    STATUS_DUPLICATE_SOP_INSTANCE,
                    "different content under a stored SOP Instance UID",
                    True,
                )
            self._write_durably(encoded, sha256)
            row = [*(values[c] for c in _COLUMNS), sha256, len(encoded), transfer_syntax, now]
            row.append(calling_ae)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if existing:
                    self._db.execute(
                        "INSERT INTO superseded VALUES (?, ?, ?)",
                        (values["sop_instance_uid"], existing[0], now),
                    )
                    self._db.execute(
                        "DELETE FROM instances WHERE sop_instance_uid = ?",
                        (values["sop_instance_uid"],),
                    )
                columns = ", ".join(_COLUMNS + _BOOK_KEEPING)
                marks = ", ".join("?" * len(row))
                self._db.execute(f"INSERT INTO instances ({columns}) VALUES ({marks})", row)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if existing:
            return StoreOutcome(STATUS_SUCCESS, "replaced; previous version kept", True)
        return StoreOutcome(STATUS_SUCCESS)

    def withdraw(self, sop_instance_uid: str) -> bool:
        """Takes an instance out of the index (no longer found or retrievable).

        The file stays and its hash is kept with the superseded versions, so nothing is
        lost; the reference site uses this to stage a session whose inputs are missing.
        """
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is None:
                return False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO superseded VALUES (?, ?, ?)", (sop_instance_uid, row[0], now)
                )
                self._db.execute(
                    "DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    # -- reading ---------------------------------------------------------------------------

    def _instance(self, row: sqlite3.Row | tuple) -> StoredInstance:
        values = dict(zip(_COLUMNS, row[: len(_COLUMNS)], strict=True))
        sha256, size, transfer_syntax = row[len(_COLUMNS) : len(_COLUMNS) + 3]
        return StoredInstance(values, sha256, int(size), transfer_syntax)

    def select(self, where: str = "", params: tuple | list = ()) -> list[StoredInstance]:
        """Index rows matching an SQL condition built by the Q/R layer from index columns."""
        sql = f"SELECT {', '.join(_COLUMNS + _BOOK_KEEPING)} FROM instances"
        if where:
            sql += f" WHERE {where}"
        sql += " ORDER BY study_instance_uid, series_instance_uid, CAST(instance_number AS INT)"
        with self._lock:
            rows = self._db.execute(sql, list(params)).fetchall()
        return [self._instance(row) for row in rows]

    def get(self, sop_instance_uid: str) -> StoredInstance | None:
        found = self.select("sop_instance_uid = ?", (sop_instance_uid,))
        return found[0] if found else None

    def read(self, instance: StoredInstance, stop_before_pixels: bool = False) -> Dataset:
        return dcmread(self.path_for(instance.sha256), stop_before_pixels=stop_before_pixels)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def __iter__(self) -> Iterator[StoredInstance]:
        return iter(self.select())

    def superseded(self, sop_instance_uid: str) -> list[str]:
        """Content hashes of earlier versions kept under the ``replace`` policy."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sha256 FROM superseded WHERE sop_instance_uid = ? ORDER BY superseded_at",
                (sop_instance_uid,),
            ).fetchall()
        return [row[0] for row in rows]
