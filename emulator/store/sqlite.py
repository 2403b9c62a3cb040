"""Opens the project's SQLite databases the one durable way: WAL and synchronous=FULL.

Both the object index and the UPS store acknowledge to peers only after a commit, so both
must survive a kill -9 right after that commit.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """A connection shared by association threads (callers serialise with their own lock)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
