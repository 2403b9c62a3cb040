"""Work around midnight: a session is never split over two days, and a device just after
midnight still finds a session scheduled just before it (CI ran at 23:58 once, and every
session seeded then reached the devices as three UPS today and a delivery tomorrow)."""

from __future__ import annotations

import datetime as dt

from emulator.performer.actors import STEP_ORDER, session_key, step_of
from emulator.performer.workflow import worklist_identifier
from emulator.reference.scheduler import STEP_OFFSETS, within_one_day
from emulator.reference.site import ReferenceSite, SiteConfig


def test_a_session_keeps_its_four_steps_on_one_day():
    late = dt.datetime(2026, 12, 1, 23, 58)
    start = within_one_day(late)
    last = start + dt.timedelta(minutes=max(STEP_OFFSETS.values()))
    assert start.date() == last.date() == late.date() and last <= late.replace(minute=59)
    noon = dt.datetime(2026, 12, 1, 12, 0)
    assert within_one_day(noon) == noon


def test_the_worklist_range_reaches_back_an_hour_after_midnight():
    after_midnight = dt.datetime(2026, 12, 2, 0, 10)
    query = worklist_identifier("LINAC1", now=after_midnight)
    assert query.ScheduledProcedureStepStartDateTime == "20261201231000-20261202235959"
    noon = dt.datetime(2026, 12, 2, 12, 0)
    assert worklist_identifier("LINAC1", now=noon).ScheduledProcedureStepStartDateTime == (
        "20261202000000-20261202235959"
    )


def test_a_session_seeded_at_23_58_is_one_session_of_four_on_its_day(tmp_path):
    """Through the reference TMS's own scheduler and store, read back as a device groups."""
    site = ReferenceSite(SiteConfig(data_dir=tmp_path / "site", accept_any_ae=True))
    try:
        session_id = site.seed("LINAC1", 1, start=dt.datetime(2026, 12, 1, 23, 58))
        records = site.tms.ups.select("session_id = ?", [session_id])
    finally:
        site.stop()
    keys = {session_key(r.dataset) for r in records}
    assert len(keys) == 1 and next(iter(keys))[1] == "20261201", keys
    assert sorted(step_of(r.dataset) for r in records) == sorted(STEP_ORDER)
