"""Keeps every soak station supplied with work on the embedded reference TMS.

A station gets its next session only when none of its UPS is SCHEDULED or IN PROGRESS: a
device groups the UPS of one patient and day into one session (RO-17 Note 8), so two
pending sessions of the same patient would be merged, and a CONTINUATION the TMS scheduled
after an interruption must be delivered before the next fraction. Each station treats one
synthetic patient fraction by fraction; when the course is complete, a new patient is seeded.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from dataclasses import dataclass

from emulator.reference.site import ReferenceSite

PENDING = ("SCHEDULED", "IN PROGRESS")


@dataclass
class _Course:
    plan_uid: str
    fractions_planned: int
    next_fraction: int


class SessionFeeder:
    """Schedules sessions on demand; ``stop()`` ends feeding so the run can drain."""

    def __init__(self, site: ReferenceSite, stations: list[str]) -> None:
        self.site = site
        self._locks = {station: threading.Lock() for station in stations}
        self._courses: dict[str, _Course] = {}
        self._patients = itertools.count(1)
        self._patient_lock = threading.Lock()
        self.scheduled = 0
        self.feeding = True

    def stop(self) -> None:
        self.feeding = False

    def pending(self, station: str) -> int:
        marks = ", ".join("?" * len(PENDING))
        return len(
            self.site.tms.ups.select(
                f"station_code = ? AND state IN ({marks})", [station, *PENDING]
            )
        )

    def ensure(self, station: str) -> bool:
        """Schedules the station's next session if it has none pending; True if it did."""
        if not self.feeding:
            return False
        with self._locks[station]:
            if self.pending(station):
                return False
            course = self._courses.get(station)
            if course is None or course.next_fraction > course.fractions_planned:
                course = self._new_course(station)
            else:
                self.site.tms.scheduler.schedule_session(
                    course.plan_uid,
                    station,
                    dt.datetime.now().replace(microsecond=0),
                    course.next_fraction,
                )
            course.next_fraction += 1
            self.scheduled += 1
            return True

    def _new_course(self, station: str) -> _Course:
        """Seeds a patient, which schedules fraction 1."""
        with self._patient_lock:
            index = next(self._patients)
        session_id = self.site.seed(station, index)
        session = self.site.tms.ups.session(session_id)
        plan = self.site.archive.store.get(session.plan_uid)
        planned = int(
            self.site.archive.store.read(plan, stop_before_pixels=True)
            .FractionGroupSequence[0]
            .NumberOfFractionsPlanned
        )
        course = _Course(session.plan_uid, planned, 1)
        self._courses[station] = course
        return course
