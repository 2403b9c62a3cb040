"""Keeps soak stations supplied with work, from inside the reference TMS.

A station matching the feed pattern (``tdw-emu tms --feed 'SOAK*'``) that queries its
worklist and has nothing SCHEDULED or IN PROGRESS gets its next session. Feeding from the
TMS, not from the devices, is what lets devices in other processes or on other machines
(soak workers, Locust workers) be fed with no coordination: they only query, as a real
device does.

The query itself is never slowed down: it only puts the station on a queue, and one thread
seeds and schedules, so the next poll finds the work. A station gets its next session only
when none of its UPS is pending: a device groups the UPS of one patient and day into one
session (RO-17 Note 8), so two pending sessions of the same patient would be merged, and a
CONTINUATION the TMS scheduled after an interruption must be delivered before the next
fraction. Each station treats one synthetic patient fraction by fraction; when the course
is complete, a new patient is seeded.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from emulator.reference.scheduler import Scheduler
from emulator.reference.ups_store import UpsStore

LOG = logging.getLogger("tdw.feeder")
PENDING = ("SCHEDULED", "IN PROGRESS")


@dataclass
class _Course:
    plan_uid: str
    fractions_planned: int
    next_fraction: int


@dataclass(frozen=True)
class FeedPlan:
    """Which stations are fed, and for how long from the start of feeding."""

    pattern: str
    for_s: float | None = None  # None: until stopped
    # Stations given their first session before the TMS listens: seeding a patient costs
    # the TMS about a second of CPU, and a fleet arriving at once would otherwise wait for
    # hundreds of them while its first queries are served.
    prime: tuple[str, ...] = ()

    def matches(self, station: str) -> bool:
        return fnmatch.fnmatchcase(station, self.pattern)


class SessionFeeder:
    """Schedules sessions on demand; ``stop()`` ends feeding so a run can drain.

    ``seed_course(station, index)`` stores patient ``index`` and schedules its fraction 1,
    returning (plan UID, fractions planned): the site's seeding, passed in so the feeder
    does not depend on how patients are made.
    """

    def __init__(
        self,
        plan: FeedPlan,
        ups: UpsStore,
        scheduler: Scheduler,
        seed_course: Callable[[str, int], tuple[str, int]],
    ) -> None:
        self.plan = plan
        self.ups = ups
        self.scheduler = scheduler
        self.seed_course = seed_course
        self._courses: dict[str, _Course] = {}
        self._patients = itertools.count(1)
        self._requests: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self.scheduled = 0
        self.errors = 0
        self.started = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="session-feeder", daemon=True)
        self._thread.start()

    @property
    def feeding(self) -> bool:
        if self._stopped.is_set():
            return False
        return self.plan.for_s is None or time.monotonic() - self.started < self.plan.for_s

    def stop(self) -> None:
        self._stopped.set()
        self._requests.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def asked(self, station: str) -> None:
        """A worklist query for ``station``: queue it for feeding (never blocks)."""
        if not self.feeding or not self.plan.matches(station):
            return
        with self._lock:
            if station in self._queued:
                return
            self._queued.add(station)
        self._requests.put(station)

    def pending(self, station: str) -> int:
        marks = ", ".join("?" * len(PENDING))
        return len(self.ups.select(f"station_code = ? AND state IN ({marks})", [station, *PENDING]))

    def ensure(self, station: str) -> bool:
        """Schedules the station's next session if it has none pending; True if it did."""
        with self.scheduler.station_lock(station):
            return self._ensure(station)

    def _ensure(self, station: str) -> bool:
        if not self.feeding or self.pending(station):
            return False
        course = self._courses.get(station)
        if course is None or course.next_fraction > course.fractions_planned:
            plan_uid, planned = self.seed_course(station, next(self._patients))
            course = self._courses[station] = _Course(plan_uid, planned, 1)
        else:
            self.scheduler.schedule_session(
                course.plan_uid,
                station,
                dt.datetime.now().replace(microsecond=0),
                course.next_fraction,
            )
        course.next_fraction += 1
        self.scheduled += 1
        return True

    def _serve(self) -> None:
        while True:
            station = self._requests.get()
            if station is None:
                return
            with self._lock:
                self._queued.discard(station)
            try:
                self.ensure(station)
            except Exception:  # one station's failure must not starve the others
                self.errors += 1
                LOG.exception("feeding %s failed", station)
