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
