"""The reactor never takes the response a send_*() is waiting for (emulator/net/dimse_queue_guard).

The race needs the reactor thread to run its queue read in a microsecond-wide window; these
tests put a real association into exactly that state instead of hoping to hit it: the
reactor paused by a sender (checkpoint cleared), a real C-ECHO response from DCMTK's
storescp already decoded into the queue, then the reactor's read.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from emulator.net import dimse_queue_guard
from emulator.net.ports import free_port, wait_for_port
from tests.conftest import dcmtk


@pytest.fixture
def echo_association():
    port = free_port()
    scp = subprocess.Popen([dcmtk("storescp"), "--aetitle", "ECHOSCP", str(port)])
    try:
        wait_for_port(port)
        ae = AE("GUARDTEST")
        ae.add_requested_context(Verification)
        ae.dimse_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title="ECHOSCP")
        assert assoc.is_established
        yield assoc
        assoc.release()
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def _pause_reactor(assoc) -> None:
    """What every send_*() does first: clear the checkpoint, wait until the reactor parks."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    time.sleep(0.01)  # past any in-flight loop turn: the reactor is blocked in wait()


def _echo_response_queued(assoc, message_id: int) -> None:
    """Send a C-ECHO-RQ the way send_c_echo() does and wait until its response is decoded."""
    request = C_ECHO()
    request.MessageID = message_id
    request.AffectedSOPClassUID = Verification
    assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
    deadline = time.monotonic() + 5
    while assoc.dimse.msg_queue.empty():
        assert time.monotonic() < deadline, "storescp did not answer the C-ECHO"
        time.sleep(0.001)


def _read_as_reactor(assoc):
    """The reactor's non-blocking read, from a thread other than the sender's."""
    taken = []
    reader = threading.Thread(target=lambda: taken.append(assoc.dimse.get_msg(block=False)))
    reader.start()
    reader.join(5)
    return taken[0]


def test_guard_is_installed_by_the_net_package():
    assert dimse_queue_guard.installed()


def test_reactor_leaves_the_waiting_senders_response(echo_association):
    assoc = echo_association
    _pause_reactor(assoc)  # a send_*() is in progress
    try:
        _echo_response_queued(assoc, message_id=7)
        assert _read_as_reactor(assoc) == (None, None)
        _context_id, response = assoc.dimse.get_msg(block=True)  # the sender's read
    finally:
        assoc._reactor_checkpoint.set()
    assert response.MessageIDBeingRespondedTo == 7
    assert response.Status == 0x0000
    # The association still works for the next exchange through the public API.
    assert assoc.send_c_echo().Status == 0x0000


def test_without_a_waiting_sender_a_stale_response_is_still_taken(echo_association):
    """pynetdicom's own behaviour is kept: an unclaimed response does not block the queue."""
    assoc = echo_association
    _pause_reactor(assoc)
    try:
        _echo_response_queued(assoc, message_id=9)
    finally:
        assoc._reactor_checkpoint.set()  # the sender gave up (timed out)
    # The running reactor may take it first; either way it leaves the queue.
    deadline = time.monotonic() + 5
    while not assoc.dimse.msg_queue.empty():
        assoc.dimse.get_msg(block=False)
        assert time.monotonic() < deadline
    assert assoc.send_c_echo().Status == 0x0000


def test_unguarded_reader_would_have_taken_it(echo_association, monkeypatch):
    """The same interleaving without the guard loses the response: the defect is real."""
    monkeypatch.setattr(
        dimse_queue_guard.DIMSEServiceProvider, "get_msg", dimse_queue_guard._original_get_msg
    )
    assoc = echo_association
    _pause_reactor(assoc)
    try:
        _echo_response_queued(assoc, message_id=11)
        _context_id, taken = _read_as_reactor(assoc)
    finally:
        assoc._reactor_checkpoint.set()
    assert taken is not None and taken.MessageIDBeingRespondedTo == 11
