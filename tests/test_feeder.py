"""The reference TMS feeds soak stations as they query, over real C-FINDs.

Devices in other processes and on other machines get work with no coordination: a station
matching the feed pattern that asks for its worklist and has nothing pending gets its next
session; primed stations have one before the TMS listens; nothing else is touched, and
feeding stops when the feed time is up.
"""

from __future__ import annotations

import threading
import time

from pydicom.uid import generate_uid

from emulator.net.peers import Peer
from emulator.performer.actors import STEP_ORDER, step_of
from emulator.reference.feeder import FeedPlan
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SOAK_PATIENTS
from tests.ups_client import UpsClient, cancellation, final_update


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


def test_the_feeder_waits_while_the_tms_schedules_after_a_canceled_step(tmp_path):
    """A performer cancels a station's positioning step: the TMS cancels the later steps
    and schedules the session again. In between the station has no pending UPS; had the
    feeder scheduled the next fraction then, the device would see two sessions of one
    patient on one day, merge them, and withhold one for good after a cancel (a CI soak
    lost a continuation so). The gap is widened here to make the race certain."""
    with _site(tmp_path, FeedPlan("FEED*", prime=("FEED001",))) as site:
        scheduler = site.tms.scheduler
        schedule_again = scheduler._schedule_again
        in_gap = threading.Event()

        def slow_schedule_again(*args, **kwargs):
            in_gap.set()
            time.sleep(1.0)
            return schedule_again(*args, **kwargs)

        scheduler._schedule_again = slow_schedule_again
        host, port = site.tms.address
        with UpsClient(host, port, "TMS", "DEVICE") as client:
            steps = {step_of(u): u for u in client.worklist("FEED001")}
            acquisition = steps["acquisition"]
            uid, transaction = acquisition.SOPInstanceUID, str(generate_uid())
            assert client.change_state(uid, "IN PROGRESS", transaction)[0] == 0x0000
            workitem = acquisition.ScheduledWorkitemCodeSequence[0]
            assert client.n_set(uid, final_update(transaction, workitem, "FEED001")) == 0
            assert client.n_set(uid, cancellation(transaction, 40.0, "couch fault")) == 0
            fed = []
            feeder = threading.Thread(
                target=lambda: in_gap.wait(10) and fed.append(site.feeder.ensure("FEED001"))
            )
            feeder.start()
            status, _ = client.change_state(
                uid, "CANCELED", transaction, ReasonForCancellation="couch fault"
            )
            feeder.join(10)
            assert status == 0x0000
            assert fed == [False]  # it waited, then found the session scheduled again
            pending = client.worklist("FEED001")
        assert sorted(step_of(u) for u in pending) == sorted(STEP_ORDER)  # one session
        assert site.feeder.scheduled == 1
