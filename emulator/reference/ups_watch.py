"""UPS Watch SCP of the reference TMS: subscriptions, and the events owed to subscribers.

PS3.4 CC.2.3: an AE subscribes (N-ACTION 3 on UPS Watch) to one UPS or to all of them
(the well-known global instance, or the filtered global instance with Matching Keys), with
or without a deletion lock; unsubscribes (4); or suspends its global subscription (5). What
each action does to the AE's subscription of each UPS, and when it owes the AE an initial
UPS State Report, is Table CC.2.3-2, read whole from ``profiles/ups_events.yaml``; nothing
here picks a row by hand. CC.2.4.3: the SCP then owes each subscriber an N-EVENT-REPORT for
every state change (State Report), a Cancel Requested, a progress update (Progress Report),
an assignment (UPS Assigned), and its own start and stop (SCP Status Change).

Subscriptions and owed events live in the UPS store's database, and the events of a change
are written by a change hook inside that change's transaction: a TMS killed after a state
change but before the event left still owes it after its restart (``EventDispatcher``
sends them).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from emulator import ups_events
from emulator.reference.ups_store import UpsRecord, UpsStore, decode_dataset, encode_dataset

FINAL_STATES = ("COMPLETED", "CANCELED")
NOT_SUBSCRIBED, WITH_LOCK, WITHOUT_LOCK = "not_subscribed", "with_lock", "without_lock"

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
CREATE TABLE IF NOT EXISTS ups_global_filters (
    ae_title TEXT PRIMARY KEY,
    matching_keys BLOB NOT NULL
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

# Matching Keys (a C-FIND identifier) -> an SQL condition on the ups table and its values,
# as the TMS's C-FIND builds it: a filtered global subscription matches as C-FIND does
# (CC.2.3.3.1). Raises ValueError for keys the TMS cannot match on.
Matcher = Callable[[Dataset], tuple[str, list]]


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
    can be reached (a configured peer), as Receiving AE C308 requires; ``matcher`` turns
    a filtered global subscription's Matching Keys into the TMS's C-FIND condition."""

    def __init__(
        self,
        store: UpsStore,
        known_ae: Callable[[str], bool],
        on_owed: Callable[[], None] | None = None,
        matcher: Matcher | None = None,
    ) -> None:
        self.store = store
        self.known_ae = known_ae
        self.matcher = matcher
        # Told after a commit that wrote events (the dispatcher wakes up).
        self.on_owed = on_owed or (lambda: None)
        store.add_schema(_SCHEMA)
        store.change_hooks.append(self._on_change)
        self.global_uid, self.filtered_global_uid = ups_events.global_instances()

    # -- N-ACTION on UPS Watch ------------------------------------------------------------

    def is_global(self, uid: str) -> bool:
        return uid in (self.global_uid, self.filtered_global_uid)

    def subscribe(
        self, ae_title: str, uid: str, deletion_lock: bool, matching_keys: Dataset | None = None
    ) -> int:
        return self.act("subscribe", ae_title, uid, deletion_lock, matching_keys)

    def unsubscribe(self, ae_title: str, uid: str) -> int:
        return self.act("unsubscribe", ae_title, uid)

    def suspend_global(self, ae_title: str, uid: str) -> int:
        return self.act("suspend_global", ae_title, uid)

    def act(
        self,
        action: str,
        ae_title: str,
        uid: str,
        deletion_lock: bool = False,
        matching_keys: Dataset | None = None,
    ) -> int:
        """One Watch action (CC.2.3.3), applied by its row of Table CC.2.3-2."""
        global_ = self.is_global(uid)
        if action == "suspend_global" and not global_:
            return ups_events.watch_status("not_appropriate")
        if action == "subscribe" and not self.known_ae(ae_title):
            return ups_events.watch_status("receiving_ae_unknown")
        record = None if global_ else self.store.get(uid)
        if not global_ and record is None:
            return ups_events.watch_status("no_such_instance")
        condition: tuple[str, list] | None = None
        if action == "subscribe" and uid == self.filtered_global_uid:
            if self.matcher is None or matching_keys is None:
                return ups_events.watch_status("no_such_instance")  # CC.2.3.3: unsupported
            condition = self.matcher(matching_keys)  # ValueError: the caller refuses it
        row = ups_events.subscription_row(
            ups_events.subscription_event(action, global_, lock=deletion_lock)
        )

        def work(db: sqlite3.Connection) -> None:
            if row.global_state is not None:
                self._set_global(
                    db, ae_title, row.global_state, matching_keys if condition else None
                )
            targets = self._managed(db, ae_title, condition) if row.applies_to_all else [record]
            for target in targets:
                self._apply(db, ae_title, target, row)

        self.store.in_transaction(work)
        self.on_owed()
        return ups_events.watch_status("success")

    def _set_global(
        self, db: sqlite3.Connection, ae_title: str, state: str, matching_keys: Dataset | None
    ) -> None:
        db.execute("DELETE FROM ups_global_subscribers WHERE ae_title = ?", (ae_title,))
        db.execute("DELETE FROM ups_global_filters WHERE ae_title = ?", (ae_title,))
        if state == "none":
            return
        db.execute(
            "INSERT INTO ups_global_subscribers VALUES (?, ?, 0)",
            (ae_title, int(state == WITH_LOCK)),
        )
        if matching_keys is not None:
            db.execute(
                "INSERT INTO ups_global_filters VALUES (?, ?)",
                (ae_title, encode_dataset(matching_keys)),
            )

    def _managed(
        self, db: sqlite3.Connection, ae_title: str, condition: tuple[str, list] | None
    ) -> list[UpsRecord]:
        """The UPS a global action reaches ("All" in Table CC.2.3-2): those the SCP manages
        (every UPS not yet final, and a final one someone holds a deletion lock on: the TMS
        keeps final UPS as history, and a global subscription must not replay it all), and
        every UPS the AE is subscribed to; narrowed by a filtered subscription's keys."""
        marks = ", ".join("?" * len(FINAL_STATES))
        where = (
            f"(state NOT IN ({marks}) OR sop_instance_uid IN (SELECT ups_uid FROM "
            "ups_subscriptions WHERE deletion_lock = 1) OR sop_instance_uid IN (SELECT "
            "ups_uid FROM ups_subscriptions WHERE ae_title = ?))"
        )
        params: list = [*FINAL_STATES, ae_title]
        if condition is not None and condition[0]:
            where += f" AND ({condition[0]})"
            params += list(condition[1])
        return self.store.select(where, params)

    def _state_of(self, db: sqlite3.Connection, ae_title: str, uid: str) -> str:
        row = db.execute(
            "SELECT deletion_lock FROM ups_subscriptions WHERE ae_title = ? AND ups_uid = ?",
            (ae_title, uid),
        ).fetchone()
        if row is None:
            return NOT_SUBSCRIBED
        return WITH_LOCK if row[0] else WITHOUT_LOCK

    def _apply(
        self,
        db: sqlite3.Connection,
        ae_title: str,
        record: UpsRecord,
        row: ups_events.SubscriptionRow,
        column: str | None = None,
    ) -> None:
        """One cell of Table CC.2.3-2 for ``record`` and ``ae_title``."""
        uid = record.sop_instance_uid
        step = row.step(column or self._state_of(db, ae_title, uid))
        if step.go == NOT_SUBSCRIBED:
            db.execute(
                "DELETE FROM ups_subscriptions WHERE ae_title = ? AND ups_uid = ?", (ae_title, uid)
            )
        elif step.go:
            db.execute(
                "INSERT OR REPLACE INTO ups_subscriptions VALUES (?, ?, ?)",
                (ae_title, uid, int(step.go == WITH_LOCK)),
            )
        if step.initial_event:
            report = ups_events.state_report(record.dataset, record.state)
            self._owe(db, ae_title, uid, ups_events.STATE_REPORT, report)

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

    def _global_subscribers(self, db: sqlite3.Connection) -> list[tuple[str, str, bytes | None]]:
        return db.execute(
            "SELECT g.ae_title, CASE WHEN g.deletion_lock THEN 'with_lock' ELSE 'without_lock' "
            "END, f.matching_keys FROM ups_global_subscribers g LEFT JOIN ups_global_filters f "
            "ON f.ae_title = g.ae_title WHERE g.suspended = 0"
        ).fetchall()

    def _matches(self, db: sqlite3.Connection, uid: str, matching_keys: bytes | None) -> bool:
        if matching_keys is None or self.matcher is None:
            return matching_keys is None
        try:
            where, params = self.matcher(decode_dataset(matching_keys))
        except ValueError:
            return False
        sql = "SELECT 1 FROM ups WHERE sop_instance_uid = ?" + (f" AND ({where})" if where else "")
        return db.execute(sql, [uid, *params]).fetchone() is not None

    def _on_created(self, db: sqlite3.Connection, created: UpsRecord) -> None:
        """CC.2.4.3 and Table CC.2.3-2 for a new UPS: each global subscriber (whose filter,
        if any, it matches) is subscribed and told of it, and of its assignment."""
        uid = created.sop_instance_uid
        assigned = ups_events.assigned(created.dataset)
        for ae_title, global_state, matching_keys in self._global_subscribers(db):
            if not self._matches(db, uid, matching_keys):
                continue
            row = ups_events.subscription_row(ups_events.creation_event(global_state))
            self._apply(db, ae_title, created, row, column="none")
            if assigned is not None:
                self._owe(db, ae_title, uid, ups_events.ASSIGNED, assigned)

    def _on_change(
        self, db: sqlite3.Connection, before: UpsRecord | None, after: UpsRecord
    ) -> None:
        """The change hook: the events a created or changed UPS owes its subscribers."""
        uid = after.sop_instance_uid
        if before is None:
            self._on_created(db, after)
            self.on_owed()
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
        if ups_events.assignment_changed(before.dataset, after.dataset):
            assigned = ups_events.assigned(after.dataset)
            if assigned is not None:
                events.append((ups_events.ASSIGNED, assigned))
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


def _progress(ds: Dataset) -> tuple:
    """What a UPS Progress Report reports (CC.2.4.3): the progress, its description and
    the communications URIs."""
    items = ds.get("ProcedureStepProgressInformationSequence") or []
    item = items[0] if items else Dataset()
    value = item.get("ProcedureStepProgress")
    return (
        None if value in (None, "") else float(value),
        str(item.get("ProcedureStepProgressDescription", "") or ""),
        str(item.get("ProcedureStepCommunicationsURISequence", "") or ""),
    )
