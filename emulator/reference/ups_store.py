"""Durable UPS state for the reference TMS: sessions, UPS attributes, Transaction UIDs.

Each UPS is kept as its full DICOM dataset plus the columns its C-FIND matches on. Every
change goes through :meth:`UpsStore.transition`, which decides and writes under one lock
inside one SQLite transaction, so two devices racing for a claim cannot both win and a
restart finds exactly the state that was last acknowledged.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from emulator.store.sqlite import open_database

T = TypeVar("T")

# UPS keyword -> (column, VR) for the keys C-FIND matches on.
UPS_COLUMNS: dict[str, tuple[str, str]] = {
    "SOPInstanceUID": ("sop_instance_uid", "UI"),
    "ProcedureStepState": ("state", "CS"),
    "ProcedureStepLabel": ("label", "LO"),
    "ScheduledProcedureStepStartDateTime": ("start_datetime", "DT"),
    "PatientName": ("patient_name", "PN"),
    "PatientID": ("patient_id", "LO"),
    "StudyInstanceUID": ("study_instance_uid", "UI"),
}
# Code sequence keyword -> (code value column, scheme column).
UPS_CODE_COLUMNS = {
    "ScheduledStationNameCodeSequence": ("station_code", "station_scheme"),
    "ScheduledWorkitemCodeSequence": ("workitem_code", "workitem_scheme"),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    station_code TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    plan_uid TEXT NOT NULL,
    fraction_number INTEGER NOT NULL,
    delivery_type TEXT NOT NULL,
    continues_session TEXT NOT NULL DEFAULT '',
    delivered_json TEXT NOT NULL DEFAULT '{}',
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ups (
    sop_instance_uid TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    step TEXT NOT NULL,
    state TEXT NOT NULL,
    transaction_uid TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    label TEXT NOT NULL DEFAULT '',
    start_datetime TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    study_instance_uid TEXT NOT NULL DEFAULT '',
    station_code TEXT NOT NULL DEFAULT '',
    station_scheme TEXT NOT NULL DEFAULT '',
    workitem_code TEXT NOT NULL DEFAULT '',
    workitem_scheme TEXT NOT NULL DEFAULT '',
    dataset BLOB NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ups_state_station ON ups (state, station_code);
"""


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as explicit VR little endian Part 10 bytes (lossless round trip)."""
    copy = Dataset(ds)
    copy.file_meta = FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def decode_dataset(data: bytes) -> Dataset:
    ds = dcmread(io.BytesIO(data), force=True)
    ds.file_meta = FileMetaDataset()
    return ds


def now_dt() -> str:
    """The current local date-time as a DICOM DT value."""
    return dt.datetime.now().strftime("%Y%m%d%H%M%S")


@dataclass
class UpsRecord:
    sop_instance_uid: str
    session_id: str
    step: str
    state: str
    transaction_uid: str
    cancel_requested: bool
    dataset: Dataset
    # What the change that made this record knew and the UPS does not keep (who asked for
    # a cancel, and with what): read by the change hooks, never stored.
    context: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class SessionRecord:
    session_id: str
    station_code: str
    patient_id: str
    plan_uid: str
    fraction_number: int
    delivery_type: str
    continues_session: str = ""
    delivered: dict[int, float] = field(default_factory=dict)
    note: str = ""


ChangeHook = Callable[[sqlite3.Connection, "UpsRecord | None", "UpsRecord"], None]


def _code_of(ds: Dataset, keyword: str) -> tuple[str, str]:
    items = ds.get(keyword) or []
    if not items:
        return "", ""
    return str(items[0].get("CodeValue", "")), str(items[0].get("CodingSchemeDesignator", ""))


class UpsStore:
    """SQLite persistence of sessions and UPS, safe to share between association threads."""

    def __init__(self, path: Path, on_state: Callable[[str], None] | None = None) -> None:
        self._lock = threading.RLock()
        self._db = open_database(path, _SCHEMA)
        # Told the new state of every UPS created or moved, after the commit (metrics).
        self.on_state = on_state or (lambda state: None)
        # Called inside the transaction of every UPS created (before None) or changed, so
        # what they write (the events owed to subscribers) commits with the change or not
        # at all: a crash cannot keep one and lose the other.
        self.change_hooks: list[ChangeHook] = []

    def add_schema(self, schema: str) -> None:
        """Tables another part of the TMS keeps in this database, for its change hooks."""
        with self._lock:
            self._db.executescript(schema)

    def in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``work`` in one transaction under the store's lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return result

    def query(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs a read under the store's lock, inside a transaction if one is open."""
        with self._lock:
            return work(self._db)

    def _changed(self, before: UpsRecord | None, after: UpsRecord) -> None:
        for hook in self.change_hooks:
            hook(self._db, before, after)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row_values(self, ds: Dataset) -> dict[str, str]:
        values = {col: str(ds.get(kw, "") or "") for kw, (col, _) in UPS_COLUMNS.items()}
        for keyword, (code_col, scheme_col) in UPS_CODE_COLUMNS.items():
            values[code_col], values[scheme_col] = _code_of(ds, keyword)
        return values

    def add_session(self, session: SessionRecord, steps: list[tuple[str, Dataset]]) -> None:
        """Stores a session and its UPS in one transaction: all four or none."""
        stamp = now_dt()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session.session_id,
                        session.station_code,
                        session.patient_id,
                        session.plan_uid,
                        session.fraction_number,
                        session.delivery_type,
                        session.continues_session,
                        json.dumps({str(k): v for k, v in session.delivered.items()}),
                        session.note,
                        stamp,
                    ),
                )
                for step, ds in steps:
                    values = self._row_values(ds)
                    columns = ["session_id", "step", "dataset", "updated_at", *values]
                    self._db.execute(
                        f"INSERT INTO ups ({', '.join(columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})",
                        [session.session_id, step, encode_dataset(ds), stamp, *values.values()],
                    )
                    state = str(ds.get("ProcedureStepState", "SCHEDULED"))
                    uid = str(ds.SOPInstanceUID)
                    self._changed(
                        None, UpsRecord(uid, session.session_id, step, state, "", False, ds)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for _, ds in steps:
            self.on_state(str(ds.get("ProcedureStepState", "SCHEDULED")))

    def count_by_state(self) -> dict[str, int]:
        """UPS held, by lower-case state (``in_progress``), for the workitem gauge."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM ups GROUP BY state").fetchall()
        return {str(state).lower().replace(" ", "_"): int(n) for state, n in rows}

    def _record(self, row: tuple) -> UpsRecord:
        uid, session_id, step, state, transaction_uid, cancel, blob = row
        return UpsRecord(
            uid, session_id, step, state, transaction_uid, bool(cancel), decode_dataset(blob)
        )

    _SELECT = (
        "SELECT sop_instance_uid, session_id, step, state, transaction_uid, "
        "cancel_requested, dataset FROM ups"
    )

    def get(self, sop_instance_uid: str) -> UpsRecord | None:
        with self._lock:
            row = self._db.execute(
                f"{self._SELECT} WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return self._record(row) if row else None

    def select(self, where: str = "", params: list | tuple = ()) -> list[UpsRecord]:
        sql = self._SELECT + (f" WHERE {where}" if where else "")
        sql += " ORDER BY start_datetime, session_id, workitem_code"
        with self._lock:
            rows = self._db.execute(sql, list(params)).fetchall()
        return [self._record(r) for r in rows]

    def transition(
        self, sop_instance_uid: str, decide: Callable[[UpsRecord | None], UpsRecord | None]
    ) -> UpsRecord | None:
        """Reads, decides and writes atomically; ``decide`` returns the new record or None."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self.get(sop_instance_uid)
                updated = decide(current)
                if updated is not None:
                    values = self._row_values(updated.dataset)
                    assignments = ", ".join(f"{c} = ?" for c in values)
                    self._db.execute(
                        "UPDATE ups SET state = ?, transaction_uid = ?, cancel_requested = ?, "
                        f"dataset = ?, updated_at = ?, {assignments} WHERE sop_instance_uid = ?",
                        [
                            updated.state,
                            updated.transaction_uid,
                            int(updated.cancel_requested),
                            encode_dataset(updated.dataset),
                            now_dt(),
                            *values.values(),
                            sop_instance_uid,
                        ],
                    )
                    self._changed(current, updated)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if updated is not None and (current is None or updated.state != current.state):
            self.on_state(updated.state)
        return updated

    def station_of(self, sop_instance_uid: str) -> str:
        """The station code of the session a UPS belongs to ("" if unknown)."""
        with self._lock:
            row = self._db.execute(
                "SELECT s.station_code FROM ups u JOIN sessions s ON s.session_id = u.session_id "
                "WHERE u.sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return str(row[0]) if row else ""

    def session(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT session_id, station_code, patient_id, plan_uid, fraction_number, "
                "delivery_type, continues_session, delivered_json, note FROM sessions "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchone()
        if not row:
            return None
        delivered = {int(k): float(v) for k, v in json.loads(row[7]).items()}
        return SessionRecord(*row[:7], delivered=delivered, note=row[8])

    def sessions(self) -> list[SessionRecord]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT session_id FROM sessions ORDER BY rowid")]
        return [s for s in (self.session(i) for i in ids) if s]

    def set_session_note(self, session_id: str, note: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET note = ? WHERE session_id = ?", (note, session_id)
            )
