"""UPS Watch SCP of the reference TMS: subscriptions, and the events owed to subscribers.

PS3.4 CC.2.3: an AE subscribes (N-ACTION 3 on UPS Watch) to one UPS or to all of them
(the well-known global instance), with or without a deletion lock; unsubscribes (4); or
suspends its global subscription (5: no new UPS are added, those it has stay). CC.2.4: the
SCP then owes each subscriber an N-EVENT-REPORT for every state change (State Report), a
Cancel Requested, a progress update (Progress Report), and its own start and stop (SCP
Status Change); a new subscription gets the UPS's current state at once.

Subscriptions and owed events live in the UPS store's database, and the events of a change
are written by a change hook inside that change's transaction: a TMS killed after a state
change but before the event left still owes it after its restart (``EventDispatcher``
sends them).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset

from emulator import ups_events
from emulator.reference.ups_store import UpsRecord, UpsStore, decode_dataset, encode_dataset

FINAL_STATES = ("COMPLETED", "CANCELED")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ups_subscriptions (
    ae_title TEXT NOT NULL,
    ups_uid TEXT NOT NULL,
    deletion_lock INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ae_title, ups_uid)
);
CREATE TABLE IF NOT EXISTS ups_global_subscribers (
    ae_title TEXT PRIMARY KEY,
    deletion_lock INTEGER NOT NULL DEFAULT 0,
    suspended INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ups_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ae_title TEXT NOT NULL,
    ups_uid TEXT NOT NULL,
    event_type INTEGER NOT NULL,
    dataset BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    delivered_at REAL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ups_events_owed ON ups_events (delivered_at, next_try);
"""


@dataclass(frozen=True)
class OwedEvent:
    id: int
    ae_title: str
    ups_uid: str
    event_type: int
    dataset: Dataset
    attempts: int


class UpsWatch:
    """Subscriptions and the durable log of events owed; ``known_ae`` says whether an AE
    can be reached (a configured peer), as Receiving AE C308 requires."""

    def __init__(self, store: UpsStore, known_ae, on_owed=None) -> None:
        self.store = store
        self.known_ae = known_ae
        # Told after a commit that wrote events (the dispatcher wakes up).
        self.on_owed = on_owed or (lambda: None)
        store.add_schema(_SCHEMA)
        store.change_hooks.append(self._on_change)
        self.global_uid, self.filtered_global_uid = ups_events.global_instances()

    # -- N-ACTION on UPS Watch ------------------------------------------------------------

    def is_global(self, uid: str) -> bool:
        return uid in (self.global_uid, self.filtered_global_uid)

    def subscribe(self, ae_title: str, uid: str, deletion_lock: bool) -> int:
        if not self.known_ae(ae_title):
            return ups_events.watch_status("receiving_ae_unknown")
        if uid in (self.global_uid, self.filtered_global_uid):
            self.store.in_transaction(
                lambda db: self._subscribe_global(db, ae_title, deletion_lock)
            )
        else:
            record = self.store.get(uid)
            if record is None:
                return ups_events.watch_status("no_such_instance")
            self.store.in_transaction(
                lambda db: self._subscribe_one(db, ae_title, record, deletion_lock)
            )
        self.on_owed()
        return ups_events.watch_status("success")

    def unsubscribe(self, ae_title: str, uid: str) -> int:
        def work(db: sqlite3.Connection) -> None:
            if self.is_global(uid):
                db.execute("DELETE FROM ups_global_subscribers WHERE ae_title = ?", (ae_title,))
                db.execute("DELETE FROM ups_subscriptions WHERE ae_title = ?", (ae_title,))
            else:
                db.execute(
                    "DELETE FROM ups_subscriptions WHERE ae_title = ? AND ups_uid = ?",
                    (ae_title, uid),
                )

        if not self.is_global(uid) and self.store.get(uid) is None:
            return ups_events.watch_status("no_such_instance")
        self.store.in_transaction(work)
        return ups_events.watch_status("success")

    def suspend_global(self, ae_title: str, uid: str) -> int:
        if not self.is_global(uid):
            return ups_events.watch_status("not_appropriate")
        self.store.in_transaction(
            lambda db: db.execute(
                "UPDATE ups_global_subscribers SET suspended = 1 WHERE ae_title = ?", (ae_title,)
            )
        )
        return ups_events.watch_status("success")

    def _subscribe_one(
        self, db: sqlite3.Connection, ae_title: str, record: UpsRecord, lock: bool
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO ups_subscriptions VALUES (?, ?, ?)",
            (ae_title, record.sop_instance_uid, int(lock)),
        )
        # CC.2.3.3: the subscriber is told the UPS's state at once.
        report = ups_events.state_report(record.dataset, record.state)
        self._owe(db, ae_title, record.sop_instance_uid, ups_events.STATE_REPORT, report)

    def _subscribe_global(self, db: sqlite3.Connection, ae_title: str, lock: bool) -> None:
        db.execute(
            "INSERT OR REPLACE INTO ups_global_subscribers VALUES (?, ?, 0)", (ae_title, int(lock))
        )
        marks = ", ".join("?" * len(FINAL_STATES))
        for record in self.store.select(f"state NOT IN ({marks})", list(FINAL_STATES)):
            self._subscribe_one(db, ae_title, record, lock)

    # -- what is owed ----------------------------------------------------------------------

    def _subscribers(self, db: sqlite3.Connection, uid: str) -> list[str]:
        rows = db.execute("SELECT ae_title FROM ups_subscriptions WHERE ups_uid = ?", (uid,))
        return sorted({r[0] for r in rows})

    def _owe(
        self, db: sqlite3.Connection, ae_title: str, uid: str, event_type: int, info: Dataset
    ) -> None:
        db.execute(
            "INSERT INTO ups_events (ae_title, ups_uid, event_type, dataset, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (ae_title, uid, event_type, encode_dataset(info), time.time()),
        )

    def _on_change(
        self, db: sqlite3.Connection, before: UpsRecord | None, after: UpsRecord
    ) -> None:
        """The change hook: the events a created or changed UPS owes its subscribers."""
        uid = after.sop_instance_uid
        if before is None:
            globals_ = db.execute(
                "SELECT ae_title, deletion_lock FROM ups_global_subscribers WHERE suspended = 0"
            ).fetchall()
            for ae_title, lock in globals_:
                self._subscribe_one(db, ae_title, after, bool(lock))
            return
        events: list[tuple[int, Dataset]] = []
        if after.cancel_requested and not before.cancel_requested:
            requester = str(after.context.get("requesting_ae", ""))
            request = after.context.get("request")
            events.append(
                (ups_events.CANCEL_REQUESTED, ups_events.cancel_requested(requester, request))
            )
        if after.state != before.state:
            if before.state == "SCHEDULED" and after.state == "CANCELED":
                # CC.2.2.3: a SCHEDULED UPS is canceled by going IN PROGRESS, then CANCELED.
                in_progress = ups_events.state_report(after.dataset, "IN PROGRESS")
                events.append((ups_events.STATE_REPORT, in_progress))
            events.append((ups_events.STATE_REPORT, ups_events.state_report(after.dataset)))
        elif _progress(before.dataset) != _progress(after.dataset):
            events.append((ups_events.PROGRESS_REPORT, ups_events.progress_report(after.dataset)))
        for ae_title in self._subscribers(db, uid):
            for event_type, info in events:
                self._owe(db, ae_title, uid, event_type, info)
        if events:
            self.on_owed()  # the dispatcher reads after this commit: it needs the lock

    def scp_status(self, status: str, lists: str = "WARM START") -> None:
        """An SCP Status Change to every subscriber (CC.2.4.3), at start and at stop."""
        info = ups_events.scp_status_change(status, lists)

        def work(db: sqlite3.Connection) -> None:
            rows = db.execute(
                "SELECT ae_title FROM ups_subscriptions UNION "
                "SELECT ae_title FROM ups_global_subscribers"
            ).fetchall()
            for (ae_title,) in rows:
                self._owe(db, ae_title, self.global_uid, ups_events.SCP_STATUS_CHANGE, info)

        self.store.in_transaction(work)
        self.on_owed()

    # -- for the dispatcher ----------------------------------------------------------------

    def due(self, limit: int = 200) -> list[OwedEvent]:
        """Events not yet delivered, oldest first, of the AEs none of whose events waits for
        a later retry: an AE gets its events in the order they were made."""

        def work(db: sqlite3.Connection) -> list[tuple]:
            now = time.time()
            return db.execute(
                "SELECT id, ae_title, ups_uid, event_type, dataset, attempts FROM ups_events "
                "WHERE delivered_at IS NULL AND ae_title NOT IN (SELECT ae_title FROM "
                "ups_events WHERE delivered_at IS NULL AND next_try > ?) ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()

        rows = self.store.in_transaction(work)
        return [OwedEvent(r[0], r[1], r[2], r[3], decode_dataset(r[4]), r[5]) for r in rows]

    def delivered(self, event_id: int) -> None:
        self.store.in_transaction(
            lambda db: db.execute(
                "UPDATE ups_events SET delivered_at = ? WHERE id = ?", (time.time(), event_id)
            )
        )

    def failed(self, event_id: int, error: str, retry_in_s: float) -> None:
        self.store.in_transaction(
            lambda db: db.execute(
                "UPDATE ups_events SET attempts = attempts + 1, next_try = ?, error = ? "
                "WHERE id = ?",
                (time.time() + retry_in_s, error[:200], event_id),
            )
        )

    def owed_count(self) -> int:
        return int(
            self.store.in_transaction(
                lambda db: db.execute(
                    "SELECT COUNT(*) FROM ups_events WHERE delivered_at IS NULL"
                ).fetchone()[0]
            )
        )

    def subscribers(self, uid: str) -> list[str]:
        """AEs subscribed to ``uid``; callable inside a UPS transition's decision."""
        return self.store.query(lambda db: self._subscribers(db, uid))


def _progress(ds: Dataset) -> float | None:
    items = ds.get("ProcedureStepProgressInformationSequence") or []
    value = items[0].get("ProcedureStepProgress") if items else None
    return None if value in (None, "") else float(value)
