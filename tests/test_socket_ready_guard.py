"""Associations work on descriptors past FD_SETSIZE (emulator/net/socket_ready_guard).

A fleet process holds more than 1024 descriptors; pynetdicom's select()-based readiness
check then kills every new association. The tests hold that many descriptors open for
real, then talk to DCMTK's storescp.
"""

from __future__ import annotations

import os
import resource

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from emulator.net import socket_ready_guard


@pytest.fixture
def many_descriptors():
    """Opens descriptors until the next one is numbered well past 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = []
    while not held or held[-1] < 1100:
        held.append(os.open(os.devnull, os.O_RDONLY))
    yield
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _echo(port: int):
    ae = AE("FDTEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    try:
        fileno = assoc.dul.socket.socket.fileno() if assoc.is_established else -1
        status = assoc.send_c_echo() if assoc.is_established else None
        return fileno, status
    finally:
        if assoc.is_established:
            assoc.release()


def test_guard_is_installed_by_the_net_package():
    assert socket_ready_guard.installed()


def test_an_association_on_a_high_descriptor_works(many_descriptors, storescp):
    fileno, status = _echo(storescp[0])
    assert fileno >= 1024
    assert status is not None and status.Status == 0x0000


def test_unguarded_pynetdicom_loses_it(many_descriptors, storescp, monkeypatch):
    """The same exchange with pynetdicom's own check fails: the defect is real."""
    monkeypatch.setattr(AssociationSocket, "ready", socket_ready_guard._original_ready)
    _fileno, status = _echo(storescp[0])
    assert status is None  # pynetdicom read its ValueError as a closed connection
