"""pynetdicom's loops wait for work, and associations behave as before (reactor_wakeup).

Against DCMTK on both sides: storescp as the acceptor of our requests, echoscu and
storescu as requestors of our Storage SCP. Counted, not timed: how often an idle
association's loops turn, with the guard and without it.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from emulator.net import reactor_wakeup
from emulator.net.ports import free_port, wait_for_port
from emulator.net.shared_receiver import SharedStorageReceiver
from tests.conftest import DCMTK_ENV, dcmtk


@pytest.fixture
def killable_storescp(tmp_path):
    """storescp with its process, for the test that kills it."""
    port = free_port()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "--aetitle", "STORESCP", "-od", str(tmp_path), str(port)]
    )
    wait_for_port(port)
    yield scp, port
    if scp.poll() is None:
        scp.terminate()
        scp.wait(timeout=10)


def _associate(port: int):
    ae = AE("WAKETEST")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    return assoc


def _reactor_turns(assoc, seconds: float) -> int:
    """How many times the association reactor went round while idle for ``seconds``: it
    passes its checkpoint once a turn."""
    turns = 0
    checkpoint = assoc._reactor_checkpoint
    original = checkpoint.wait

    def counting_wait(timeout=None):
        nonlocal turns
        if threading.current_thread() is assoc:
            turns += 1
        return original(timeout)

    checkpoint.wait = counting_wait
    try:
        time.sleep(seconds)
    finally:
        del checkpoint.wait
    return turns


def test_installed_by_the_net_package():
    assert reactor_wakeup.installed()


def test_exchanges_work_and_an_idle_association_stops_polling(killable_storescp, patient_files):
    _, port = killable_storescp
    assoc = _associate(port)
    try:
        assert assoc.send_c_echo().Status == 0x0000
        ct = next(p for p in patient_files if p.name.startswith("CT"))
        from pydicom import dcmread

        assert assoc.send_c_store(dcmread(ct)).Status == 0x0000
        turns = _reactor_turns(assoc, 1.0)
        assert assoc.send_c_echo().Status == 0x0000  # woken promptly for the next exchange
    finally:
        assoc.release()
    assert assoc.is_released
    # At most one turn per IDLE_WAIT_S, where pynetdicom turns every millisecond.
    assert turns <= 1.0 / reactor_wakeup.IDLE_WAIT_S + 5, turns


def test_without_the_guard_the_same_association_polls(killable_storescp):
    """The comparison the guard is for: pynetdicom as shipped turns hundreds of times."""
    _, port = killable_storescp
    reactor_wakeup.uninstall()
    try:
        assoc = _associate(port)
        try:
            turns = _reactor_turns(assoc, 1.0)
        finally:
            assoc.release()
    finally:
        reactor_wakeup.install()
    assert turns >= 200, turns


def test_a_peer_that_dies_is_noticed(killable_storescp):
    scp, port = killable_storescp
    assoc = _associate(port)
    scp.send_signal(signal.SIGKILL)
    scp.wait(timeout=10)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not assoc.is_established
    assert assoc.is_aborted or not assoc.is_alive()


def test_dcmtk_requestors_are_served(tmp_path, patient_files):
    from pynetdicom.sop_class import CTImageStorage as ct_class

    with SharedStorageReceiver([ct_class]) as receiver:
        inbox = receiver.attach("PDS001", tmp_path / "in", ["ECHOSCU", "STORESCU"])
        host, port = receiver.address
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PDS001", host, str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            env=DCMTK_ENV,
        )
        assert echo.returncode == 0, echo.stderr
        cts = [p for p in patient_files if p.name.startswith("CT")][:3]
        store = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PDS001", host, str(port), *cts],
            capture_output=True,
            text=True,
            timeout=30,
            env=DCMTK_ENV,
        )
        assert store.returncode == 0, store.stderr
        assert inbox.store.count() == 3


def test_a_sender_wakes_the_idle_reactor_to_park(killable_storescp):
    """Every send_*() clears the reactor's checkpoint and spins until the reactor parks; the
    clear must wake it, or each exchange would wait out the idle wait."""
    _, port = killable_storescp
    assoc = _associate(port)
    try:
        wakes = []
        original = assoc._tdw_wake.set
        assoc._tdw_wake.set = lambda: (wakes.append(1), original())
        assoc._reactor_checkpoint.clear()
        assoc._reactor_checkpoint.set()
        del assoc._tdw_wake.set
        assert wakes
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
