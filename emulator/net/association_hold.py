"""One association kept open between the exchanges of a burst, closed when the burst ends.

A device's exchanges with its TMS come in bursts: the worklist query and the claims, a
claim's progress and final N-SETs and its COMPLETED, a few milliseconds apart; then a CBCT
or a beam of seconds to minutes with nothing to say. An association per exchange costs a
TCP connect, an A-ASSOCIATE negotiation and an A-RELEASE each time (34 associations, about
25 ms each, in benchmarks/session_cycle.py's PDS session); one association held through
the machine's work would hold a TMS association slot per device for the whole session and
meet the TMS's idle timeout mid-beam.

So an exchange borrows the held association when there is one, and gives it back after;
``hold_s`` after its last use it is released (by one closer thread per process), well
within any TMS's idle timeout (typically 30 to 300 s). An exchange that finds the held
association busy (another thread's progress report) opens its own and releases it after:
no exchange waits for another.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

LOG = logging.getLogger("tdw.net")


class Closable(Protocol):
    def is_open(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class _Closer:
    """A daemon thread that runs each scheduled close when its time comes; the releases run
    on a few pool threads, so one slow peer's A-RELEASE-RP delays no other close."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._wake = threading.Condition()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tdw-assoc-close")

    def at(self, when: float, action: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._due, (when, next(self._order), action))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tdw-assoc-closer", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._wake.wait(timeout)
                _when, _order, action = heapq.heappop(self._due)
            self._pool.submit(action)


_CLOSER = _Closer()


class AssociationHold(Generic[C]):
    """Lends one held connection to an exchange at a time; opens others when it is lent."""

    def __init__(self, open_connection: Callable[[], C], hold_s: float) -> None:
        self._open = open_connection
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._held: C | None = None
        self._last_use = 0.0
        self._closed = False
        self.opened = 0  # associations opened, for the benchmarks and tests

    @contextlib.contextmanager
    def connection(self) -> Iterator[tuple[C, bool]]:
        """(connection, reused): the held one when free and still open, else a new one.

        An exception inside the block discards the connection (released if it still can
        be): after a failure nothing is known about its state.
        """
        connection, reused = self._borrow()
        if connection is None:
            connection = self._open()
            self.opened += 1
        try:
            yield connection, reused
        except BaseException:
            self._discard(connection)
            raise
        self._give_back(connection)

    def close(self) -> None:
        """Releases the held connection now; later exchanges open their own and release them."""
        with self._lock:
            self._closed = True
        self.release_held()

    def release_held(self) -> None:
        """Releases the held connection now (the caller knows the burst is over)."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            self._discard(held)

    def _borrow(self) -> tuple[C | None, bool]:
        with self._lock:
            held, self._held = self._held, None
        if held is None:
            return None, False
        if held.is_open():
            return held, True
        self._discard(held)  # the TMS ended it while it was held
        return None, False

    def _give_back(self, connection: C) -> None:
        if self.hold_s > 0 and connection.is_open():
            with self._lock:
                if self._held is None and not self._closed:
                    self._held = connection
                    self._last_use = time.monotonic()
                    _CLOSER.at(self._last_use + self.hold_s, self._close_if_idle)
                    return
        self._discard(connection)

    def _close_if_idle(self) -> None:
        with self._lock:
            held = self._held
            if held is None or time.monotonic() - self._last_use < self.hold_s - 0.001:
                return  # lent out again, or used since: its own close is scheduled
            self._held = None
        self._discard(held)

    @staticmethod
    def _discard(connection: Closable) -> None:
        try:
            connection.close()
        except Exception as exc:  # a close that fails leaves nothing to do but say so
            LOG.debug("closing a held association: %s", exc)
