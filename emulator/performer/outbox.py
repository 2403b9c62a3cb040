"""The device's durable state: results spooled until the Archive acknowledges them
(RO-22 to RO-24), and the UPS it has claimed until the TMS accepted their end.

A result is kept in the device's own store and entered here before it is sent, so an
Archive that is down or refuses, or an association that drops, loses nothing: the result
stays pending and is sent again later with the same SOP Instance UID, never as a new
object. A result the Archive acknowledged is marked sent and never sent again.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emulator.results.treatment_record import DeliveredBeam, DeliveredControlPoint
from emulator.store.sqlite import open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    ups_uid TEXT PRIMARY KEY,
    transaction_uid TEXT NOT NULL,
    step TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'claimed',
    progress REAL NOT NULL DEFAULT 0,
    started TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    ups_uid TEXT PRIMARY KEY,
    context TEXT NOT NULL,
    beams TEXT NOT NULL DEFAULT '[]',
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS withheld (
    ups_uid TEXT PRIMARY KEY,
    session_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    ups_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    sent_at TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class RetryPolicy:
    """How long a UPS waits for the Archive before it is canceled (results stay spooled)."""

    attempts: int = 4
    first_delay_s: float = 0.5
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        """The pause before each attempt: 0 for the first, then growing."""
        for attempt in range(self.attempts):
            yield self.first_delay_s * self.factor ** (attempt - 1) if attempt else 0.0


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


# Columns added after the first release: a data dir written by an older version gains them.
_ADDED_COLUMNS = {
    "claims": {
        "target": "TEXT NOT NULL DEFAULT ''",
        "reason": "TEXT NOT NULL DEFAULT ''",
        "cause": "TEXT NOT NULL DEFAULT ''",
    },
}


class _SpoolTable:
    """One connection to the device's spool database, serialised by a lock."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_database(path, _SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, spec in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {spec}")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ResultOutbox(_SpoolTable):
    def add(self, sop_instance_uids: list[str], ups_uid: str) -> None:
        """Enters results as pending; one already known keeps its row (and its state)."""
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO results (sop_instance_uid, ups_uid, created_at) "
                "VALUES (?, ?, ?)",
                [(uid, ups_uid, _now()) for uid in sop_instance_uids],
            )

    def pending(self, sop_instance_uids: list[str] | None = None) -> list[str]:
        """Pending results in the order they were entered (all, or among the given)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid FROM results WHERE state = 'pending' ORDER BY rowid"
            ).fetchall()
        found = [row[0] for row in rows]
        if sop_instance_uids is None:
            return found
        wanted = set(sop_instance_uids)
        return [uid for uid in found if uid in wanted]

    def for_ups(self, ups_uid: str) -> list[str]:
        """Every result entered for one UPS, sent or not, in the order entered."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid FROM results WHERE ups_uid = ? ORDER BY rowid",
                (ups_uid,),
            ).fetchall()
        return [row[0] for row in rows]

    def state(self, sop_instance_uid: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM results WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return row[0] if row else None

    def sent(self, sop_instance_uid: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE results SET state = 'sent', sent_at = ?, attempts = attempts + 1 "
                "WHERE sop_instance_uid = ?",
                (_now(), sop_instance_uid),
            )

    def failed(self, sop_instance_uids: list[str], error: str) -> None:
        with self._lock:
            self._db.executemany(
                "UPDATE results SET attempts = attempts + 1, last_error = ? "
                "WHERE sop_instance_uid = ?",
                [(error[:500], uid) for uid in sop_instance_uids],
            )


@dataclass(frozen=True)
class DeliveryContext:
    """What besides the delivered beams the RT Beams Treatment Record is built from."""

    plan_uid: str  # held in the device's store since RO-18
    previous_record_uids: list[str]
    study_instance_uid: str
    fraction: int
    session_start: str  # YYYYmmddHHMMSS
    planned_meterset: float
    # The beam tasks in delivery order: [beam number, start, end or None, delivery type].
    tasks: list[list] = field(default_factory=list)


def _beam_to_json(beam: DeliveredBeam) -> dict:
    points = [
        {**point.__dict__, "moment": point.moment.isoformat()} for point in beam.control_points
    ]
    return {**beam.__dict__, "control_points": points}


def _beam_from_json(data: dict) -> DeliveredBeam:
    points = [
        DeliveredControlPoint(**{**p, "moment": dt.datetime.fromisoformat(p["moment"])})
        for p in data["control_points"]
    ]
    return DeliveredBeam(**{**data, "control_points": points})


OPEN_CLAIM_STATES = (
    "claiming",  # the N-ACTION IN PROGRESS was being sent: the TMS may or may not hold it
    "claimed",
    "performing",
    "results_stored",
    "final_update_sent",
    "final_pending",
    "performed",  # written by earlier versions: the results were stored
)


@dataclass
class Claim:
    """A claimed UPS as journaled; ``state`` is a state of ``claim.ClaimedUps``."""

    ups_uid: str
    transaction_uid: str
    step: str
    state: str
    progress: float
    started: str  # YYYYmmddHHMMSS
    target: str = ""  # COMPLETED or CANCELED, once the work is over
    reason: str = ""  # why it is canceled, or why its final transition is pending
    cause: str = ""  # profiles/discontinuation_reasons.yaml cause of a cancel


class ClaimJournal(_SpoolTable):
    """The UPS this device holds IN PROGRESS, so a restarted process can end each one.

    Written when the TMS accepts a claim, on every progress update, when the work is done,
    and when the TMS accepts COMPLETED or CANCELED; a claim not ended is one a killed
    process left behind.
    """

    def save(self, claim: Claim) -> None:
        """Writes the claim as it is now (one row per UPS)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO claims (ups_uid, transaction_uid, step, state, "
                "progress, started, updated, target, reason, cause) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claim.ups_uid,
                    claim.transaction_uid,
                    claim.step,
                    claim.state,
                    claim.progress,
                    claim.started,
                    _now(),
                    claim.target,
                    claim.reason,
                    claim.cause,
                ),
            )

    def _set(self, ups_uid: str, column: str, value) -> None:
        with self._lock:
            self._db.execute(
                f"UPDATE claims SET {column} = ?, updated = ? WHERE ups_uid = ?",
                (value, _now(), ups_uid),
            )

    def progress(self, ups_uid: str, percent: float) -> None:
        self._set(ups_uid, "progress", percent)

    def ended(self, ups_uid: str, state: str = "ended") -> None:
        """The TMS holds the UPS in a final state: nothing of it is owed any more."""
        self._set(ups_uid, "state", state)
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE ups_uid = ?", (ups_uid,))

    # A delivery is journaled beam by beam, control point by control point, as the machine
    # reports it: what a restarted process needs to build the record of a killed session.

    def work_started(self, ups_uid: str, context: dict) -> None:
        """A delivery begins: what its record will be built from besides what is delivered
        (JSON-able; each step kind says what)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deliveries VALUES (?, ?, '[]', ?)",
                (ups_uid, json.dumps(context), _now()),
            )

    def work_done(self, ups_uid: str, items: list[dict]) -> None:
        """What the machine has delivered so far (JSON-able: beams, or channels)."""
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET beams = ?, updated = ? WHERE ups_uid = ?",
                (json.dumps(items), _now(), ups_uid),
            )

    def work(self, ups_uid: str) -> tuple[dict, list[dict]] | None:
        """What the journal holds of the UPS's delivery, or None if it never began."""
        with self._lock:
            row = self._db.execute(
                "SELECT context, beams FROM deliveries WHERE ups_uid = ?", (ups_uid,)
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def delivery_started(self, ups_uid: str, context: DeliveryContext) -> None:
        self.work_started(ups_uid, context.__dict__)

    def delivered(self, ups_uid: str, beams: list[DeliveredBeam]) -> None:
        self.work_done(ups_uid, [_beam_to_json(b) for b in beams])

    def delivery(self, ups_uid: str) -> tuple[DeliveryContext, list[DeliveredBeam]] | None:
        """What the journal holds of the UPS's beam delivery, or None if it never began."""
        journaled = self.work(ups_uid)
        if journaled is None:
            return None
        context, beams = journaled
        return DeliveryContext(**context), [_beam_from_json(b) for b in beams]

    # What a session's later steps build on (the planning CT and CBCT registered, the
    # correction found), as SOP Instance UIDs in the device's store: a process restarted
    # between two steps of a session carries on with them instead of registering nothing
    # or moving the couch by nothing.

    def session_saved(self, session_key: str, state: dict) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)",
                (session_key, json.dumps(state), _now()),
            )

    def session(self, session_key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM sessions WHERE session_key = ?", (session_key,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def session_ended(self, session_key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE session_key = ?", (session_key,))

    def open_claims(self) -> list[Claim]:
        """Claims the TMS has not accepted an end of, in the order they were made."""
        marks = ", ".join("?" * len(OPEN_CLAIM_STATES))
        with self._lock:
            rows = self._db.execute(
                "SELECT ups_uid, transaction_uid, step, state, progress, started, target, "
                f"reason, cause FROM claims WHERE state IN ({marks}) ORDER BY rowid",
                OPEN_CLAIM_STATES,
            ).fetchall()
        claims = [Claim(*row) for row in rows]
        for claim in claims:
            if claim.state == "performed":
                claim.state = "results_stored"
        return claims

    # The later steps of a stopped session that were on the worklist when it stopped: this
    # device never performs them (they stay with the TMS to end or reschedule). Kept by SOP
    # Instance UID, so a session the TMS schedules again for the same patient and day runs.

    def withhold(self, ups_uids: list[str], session_key: str, reason: str) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO withheld VALUES (?, ?, ?, ?)",
                [(uid, session_key, reason, _now()) for uid in ups_uids],
            )

    def withheld(self, ups_uid: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM withheld WHERE ups_uid = ?", (ups_uid,)
            ).fetchone()
        return row is not None
