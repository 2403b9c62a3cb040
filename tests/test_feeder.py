"""The reference TMS feeds soak stations as they query, over real C-FINDs.

Devices in other processes and on other machines get work with no coordination: a station
matching the feed pattern that asks for its worklist and has nothing pending gets its next
session; primed stations have one before the TMS listens; nothing else is touched, and
feeding stops when the feed time is up.
"""

from __future__ import annotations

import time

from emulator.net.peers import Peer
from emulator.reference.feeder import FeedPlan
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SOAK_PATIENTS
from tests.ups_client import UpsClient


def _site(tmp_path, plan: FeedPlan) -> ReferenceSite:
    return ReferenceSite(
        SiteConfig(
            data_dir=tmp_path,
            tms_port=0,
            archive_port=0,
            peers=[Peer("DEVICE", "127.0.0.1", 104)],
            seed_options=SOAK_PATIENTS,
            feed=plan,
        )
    )


def _scheduled(client: UpsClient, station: str, wait_s: float = 0.0) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        found = client.worklist(station)
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def test_primed_stations_have_work_and_queried_ones_get_it(tmp_path):
    with _site(tmp_path, FeedPlan("FEED*", prime=("FEED001",))) as site:
        host, port = site.tms.address
        with UpsClient(host, port, "TMS", "DEVICE") as client:
            assert len(_scheduled(client, "FEED001")) == 4  # before any query: primed
            assert _scheduled(client, "FEED002", wait_s=30)  # fed after its first query
            assert _scheduled(client, "OTHER01", wait_s=2) == []  # not matched: never fed
        assert site.feeder.scheduled == 2
        # One pending session per station: asking again schedules nothing more.
        site.feeder.ensure("FEED001")
        assert site.feeder.scheduled == 2


def test_feeding_stops_when_its_time_is_up(tmp_path):
    with _site(tmp_path, FeedPlan("FEED*", for_s=0.5)) as site:
        time.sleep(1.0)
        host, port = site.tms.address
        with UpsClient(host, port, "TMS", "DEVICE") as client:
            assert _scheduled(client, "FEED003", wait_s=2) == []
        assert not site.feeder.feeding
        assert site.feeder.scheduled == 0
