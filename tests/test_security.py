"""What a device on a hospital network refuses: unknown callers and unexpected SOP classes."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, DigitalMammographyXRayImageStorageForPresentation

from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes


def _receiver(tmp_path, allowed=("ARCHIVE",)) -> StorageReceiver:
    uids = load_sop_classes("final")
    receiver = StorageReceiver(
        tmp_path / "store", "PDS1", uids.archive_storage_uids(), list(allowed)
    )
    receiver.start()
    return receiver


def test_the_device_receiver_refuses_a_sop_class_it_does_not_expect(tmp_path):
    receiver = _receiver(tmp_path)
    try:
        ae = AE(ae_title="ARCHIVE")
        ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(*receiver.address, ae_title="PDS1")
        assert assoc.is_established
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        rejected = {c.abstract_syntax for c in assoc.rejected_contexts}
        assoc.release()
        # Mammography is in none of the seed's tables: that context is refused at negotiation.
        assert (
            CTImageStorage in accepted
            and DigitalMammographyXRayImageStorageForPresentation in rejected
        )
    finally:
        receiver.stop()


def test_the_device_receiver_refuses_an_unknown_caller(tmp_path):
    receiver = _receiver(tmp_path)
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(*receiver.address, ae_title="PDS1")
        assert assoc.is_rejected and not assoc.is_established
    finally:
        receiver.stop()


def test_the_tms_and_archive_refuse_an_association_addressed_to_another_ae(tmp_path):
    """DCMTK's echoscu, allowed as a caller, addressing a title that is not the server's:
    refused as "called AE title not recognised"; addressed correctly: accepted."""
    import subprocess

    from emulator.net.peers import Peer
    from emulator.reference.site import ReferenceSite, SiteConfig
    from tests.conftest import DCMTK_ENV, dcmtk

    config = SiteConfig(
        data_dir=tmp_path, tms_port=0, archive_port=0, peers=[Peer("ECHOSCU", "127.0.0.1", 104)]
    )
    with ReferenceSite(config) as site:
        for title, address in (("TMS", site.tms.address), ("ARCHIVE", site.archive.address)):

            def echo(called: str, address=address) -> subprocess.CompletedProcess:
                return subprocess.run(
                    [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", called, *map(str, address)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env=DCMTK_ENV,
                )

            wrong = echo("SOMEONEELSE")
            assert wrong.returncode != 0
            assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
            assert echo(title).returncode == 0
