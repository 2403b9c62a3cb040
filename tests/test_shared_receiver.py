"""One Storage SCP for a fleet routes by the called AE title, checked with DCMTK's storescu.

What a device's own receiver refused (an unknown called AE, a caller not on the device's
allow-list) the shared one refuses with the same A-ASSOCIATE-RJ reason, and what one device
receives never lands in another's store.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from emulator.net.shared_receiver import SharedStorageReceiver
from emulator.profile import load_profile
from tests.conftest import DCMTK_ENV, dcmtk


def storescu(calling: str, called: str, address: tuple[str, int], path: Path):
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, address[0], str(address[1]), path],
        capture_output=True,
        text=True,
        timeout=60,
        env=DCMTK_ENV,
    )


@pytest.fixture
def receiver(tmp_path):
    uids = load_profile("ihe-ro-2008", "final").sop_classes.archive_storage_uids()
    with SharedStorageReceiver(uids) as shared:
        yield shared


def test_each_called_ae_lands_in_its_own_store(receiver, tmp_path, patient_files):
    first = receiver.attach("PDS001", tmp_path / "one", ["TMS", "ARCHIVE"])
    second = receiver.attach("PDS002", tmp_path / "two", ["TMS", "ARCHIVE"])
    plan = next(p for p in patient_files if "plan" in p.name.lower())
    ct = patient_files[0]

    assert storescu("ARCHIVE", "PDS001", receiver.address, plan).returncode == 0
    assert storescu("ARCHIVE", "PDS002", receiver.address, ct).returncode == 0

    assert first.store.count() == 1
    assert second.store.count() == 1
    assert first.store.get(_uid(plan)) is not None
    assert second.store.get(_uid(ct)) is not None
    assert first.store.get(_uid(ct)) is None


def test_unknown_called_ae_and_unlisted_caller_are_rejected(receiver, tmp_path, patient_files):
    inbox = receiver.attach("PDS001", tmp_path / "one", ["TMS", "ARCHIVE"])
    path = patient_files[0]

    unknown = storescu("ARCHIVE", "PDS999", receiver.address, path)
    assert unknown.returncode != 0
    assert "Called AE Title Not Recognized" in unknown.stderr + unknown.stdout

    stranger = storescu("STRANGER", "PDS001", receiver.address, path)
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stderr + stranger.stdout

    # The shared server's own title routes nowhere.
    assert storescu("ARCHIVE", "TDWFLEET", receiver.address, path).returncode != 0
    assert inbox.store.count() == 0

    inbox.stop()  # a stopped device is no longer a destination
    assert receiver.attached == []
    gone = storescu("ARCHIVE", "PDS001", receiver.address, path)
    assert "Called AE Title Not Recognized" in gone.stderr + gone.stdout


def test_a_title_is_attached_once(receiver, tmp_path):
    receiver.attach("PDS001", tmp_path / "one", ["TMS"])
    with pytest.raises(ValueError, match="already attached"):
        receiver.attach("PDS001", tmp_path / "again", ["TMS"])
    with pytest.raises(ValueError, match="empty allow-list"):
        receiver.attach("PDS002", tmp_path / "two", [])


def _uid(path: Path) -> str:
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True).SOPInstanceUID


def test_a_peer_pattern_admits_a_whole_machine_and_no_one_else(tmp_path, patient_files):
    """``--peer 'W01*@host:port'``: every device of one soak machine may call the Archive and
    is its move destination; a title outside the pattern is rejected as unknown."""
    from emulator.net.peers import Peer, PeerDirectory
    from emulator.reference.archive import ArchiveConfig, ArchiveServer

    peers = [Peer("W01*", "127.0.0.1", 11113)]
    assert PeerDirectory(peers).get("W01PDS007") == Peer("W01PDS007", "127.0.0.1", 11113)
    assert PeerDirectory(peers).get("W02PDS007") is None
    with ArchiveServer(ArchiveConfig(tmp_path / "archive", port=0, peers=peers)) as archive:
        address = archive.address
        ok = storescu("W01PDS007", "ARCHIVE", address, patient_files[0])
        assert ok.returncode == 0, ok.stderr
        refused = storescu("W02PDS007", "ARCHIVE", address, patient_files[0])
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
