"""Results survive an Archive outage: spooled, retried with backoff, sent once, same UID."""

from __future__ import annotations

from emulator.net.peers import Peer
from emulator.performer.outbox import ResultOutbox, RetryPolicy
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.conftest import free_port

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)


def test_an_archive_outage_cancels_the_ups_and_the_record_is_sent_later(tmp_path):
    device_port, archive_port = free_port(), free_port()
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=archive_port,
            seed_options=SMALL,
            peers=[Peer("TDD1", "127.0.0.1", device_port)],
        )
    )
    with site:
        site.seed("LINAC1", 1)

        def archive_goes_down(task) -> None:
            site.archive.stop_listening()  # after RO-18 retrieval, before RO-24

        device = PerformingDevice(
            DeviceConfig(
                "tdd",
                "LINAC1",
                "TDD1",
                Peer("TMS", *site.tms.address),
                Peer("ARCHIVE", "127.0.0.1", archive_port),
                tmp_path / "device",
                listen_port=device_port,
                store_retry=RetryPolicy(attempts=3, first_delay_s=0.1),
            ),
            on_beam_start=archive_goes_down,
        )
        with device:
            (outcome,) = device.run_once()
            assert outcome.state == "CANCELED"
            assert "did not take the results after 3 attempts" in outcome.reason
            assert "kept and will be sent again" in outcome.reason
            # Never more than delivered: the beams were delivered, the record is spooled.
            assert sum(outcome.delivered.values()) > 0
            (record_uid,) = device.outbox.pending()
            assert site.archive.store.get(record_uid) is None
            assert device.metrics.pending == 1

            site.archive.start()  # the Archive is back, on the same port
            assert device.run_once() == []  # nothing scheduled, but the outbox is flushed
            assert device.outbox.pending() == []
            assert device.outbox.state(record_uid) == "sent"
            held = site.archive.store.get(record_uid)
            assert held is not None
            record = site.archive.store.read(held)
            delivered = {
                int(b.ReferencedBeamNumber): float(b.DeliveredPrimaryMeterset)
                for b in record.TreatmentSessionBeamSequence
            }
            assert delivered == outcome.delivered
            assert device.metrics.pending == 0
            # A later flush sends nothing again: acknowledged once, kept once.
            assert device.flush_outbox() == 0
            records = site.archive.store.select("modality = 'RTRECORD'")
            assert [r.sop_instance_uid for r in records] == [record_uid]


def test_a_result_is_entered_once_whatever_happens(tmp_path):
    outbox = ResultOutbox(tmp_path / "outbox.sqlite3")
    outbox.add(["1.2.3", "1.2.4"], "9.9")
    outbox.add(["1.2.3"], "9.9")
    assert outbox.pending() == ["1.2.3", "1.2.4"]
    outbox.sent("1.2.3")
    outbox.add(["1.2.3"], "9.9")  # a retry of the whole batch cannot make it pending again
    assert outbox.pending() == ["1.2.4"]
    outbox.failed(["1.2.4"], "association refused")
    assert outbox.state("1.2.4") == "pending"
    outbox.close()
    reopened = ResultOutbox(tmp_path / "outbox.sqlite3")  # after a restart
    assert reopened.pending() == ["1.2.4"]
    reopened.close()
