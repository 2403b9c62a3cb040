"""A burst of UPS exchanges travels on one association, released when the burst ends.

Against the reference TMS on 127.0.0.1 (emulator/net/association_hold.py,
emulator/performer/tms_link.py): five worklist queries in a row open one association; the
TMS sees it released ``association_hold_s`` after the last, so none is held through a long
machine step; the next exchange opens a new one. When the TMS drops the held association
(its idle timeout, a restart) the next exchange is answered at once on a new one, without
the backoff an unreachable TMS gets.
"""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.performer.tms_link import Backoff, TmsLink
from emulator.profile import load_profile
from tests.conftest import one_session_site

HOLD_S = 0.5


def _query() -> Dataset:
    query = Dataset()
    query.ProcedureStepState = "SCHEDULED"
    query.ScheduledStationNameCodeSequence = Sequence([])
    return query


def _wait_until(condition, seconds: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "the condition did not hold in time"
        time.sleep(0.01)
    return time.monotonic() - started


def _link(site, backoff: Backoff | None = None) -> TmsLink:
    return TmsLink(
        "PDS1",
        Peer("TMS", *site.tms.address),
        load_profile(),
        NetworkSettings(association_hold_s=HOLD_S),
        backoff,
    )


def test_a_burst_uses_one_association_and_releases_it_when_idle(tmp_path):
    with one_session_site(tmp_path, accept_any_ae=True) as site:
        link = _link(site)
        try:
            for _ in range(5):
                assert len(link.find(_query())) == 4
            assert link.associations_opened == 1
            assert site.tms.open_associations == 1  # held between the burst's exchanges
            released_after = _wait_until(lambda: site.tms.open_associations == 0, 5)
            assert released_after < HOLD_S + 1.0
            assert len(link.find(_query())) == 4  # the next burst: a new association
            assert link.associations_opened == 2
        finally:
            link.close()
        _wait_until(lambda: site.tms.open_associations == 0, 5)


def test_a_held_association_the_tms_dropped_is_replaced_at_once(tmp_path):
    with one_session_site(tmp_path, accept_any_ae=True) as site:
        # A first retry after 5 s: were the dropped association treated as an outage,
        # the exchange below would take that long.
        link = _link(site, Backoff(window_s=30, first_delay_s=5, max_delay_s=5))
        try:
            assert len(link.find(_query())) == 4
            for assoc in site.tms._server.active_associations:
                assoc.abort()  # the TMS ends it, as its idle timeout would
            _wait_until(lambda: site.tms.open_associations == 0, 5)
            started = time.monotonic()
            assert len(link.find(_query())) == 4
            assert time.monotonic() - started < 2.0
            assert link.associations_opened == 2
        finally:
            link.close()
