"""The link layer over real pty pairs and loopback TCP, with faults on the wire."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from devices.link import FdTransport, Link, LinkLost, SerialTransport, SocketTransport
from devices.protocol import Frame, MessageType, encode


class Tamper:
    """Wraps a transport and lets a test corrupt, duplicate or drop what it writes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.plan: list = []  # callables applied to the next writes, one each

    def read(self, size):
        return self.inner.read(size)

    def write(self, data):
        action = self.plan.pop(0) if self.plan else None
        for chunk in action(data) if action else [data]:
            self.inner.write(chunk)

    def close(self):
        self.inner.close()


def pty_pair():
    master, slave = os.openpty()
    host = SerialTransport(os.ttyname(slave))
    os.close(slave)  # pyserial holds its own descriptor
    return host, FdTransport(master)


def tcp_pair():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = SocketTransport.connect(*server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return client, SocketTransport(accepted)


MARKER = {"meterset": 999.0, "dose_rate": 1.0}


def assert_nothing_more_delivered(host: Link, ctrl: Link) -> None:
    """The link is in order: if a marker sent now is the next frame delivered, no duplicate
    or stray frame was delivered before it (a condition to wait for, not a quiet period)."""
    host.send(MessageType.METERSET, MARKER)
    frame = ctrl.recv(timeout=5)
    assert frame is not None and frame.body == MARKER, frame


@pytest.fixture(params=["pty", "tcp"])
def links(request):
    host_t, ctrl_t = pty_pair() if request.param == "pty" else tcp_pair()
    host, ctrl = Link(Tamper(host_t)), Link(Tamper(ctrl_t))
    yield host, ctrl
    host.close()
    ctrl.close()


def test_frames_arrive_in_order_once(links):
    host, ctrl = links
    for n in range(20):
        host.send(MessageType.METERSET, {"meterset": float(n), "dose_rate": 600.0})
    got = [ctrl.recv(timeout=2).body["meterset"] for _ in range(20)]
    assert got == [float(n) for n in range(20)]
    assert_nothing_more_delivered(host, ctrl)


def test_garbled_frames_are_detected_retried_and_never_misread(links):
    host, ctrl = links

    def garble(data):
        broken = bytearray(data)
        broken[len(broken) // 2] ^= 0x5A
        return [bytes(broken)]

    host.transport.plan = [garble, garble]
    host.send(MessageType.METERSET, {"meterset": 12.5, "dose_rate": 600.0})
    assert ctrl.recv(timeout=2).body == {"meterset": 12.5, "dose_rate": 600.0}
    assert ctrl.counters.garbled == 2 and host.counters.retransmits == 2
    assert_nothing_more_delivered(host, ctrl)


def test_duplicates_are_acknowledged_but_delivered_once(links):
    host, ctrl = links
    host.transport.plan = [lambda data: [data, data, data]]
    host.send(MessageType.CONTROL_POINT, {"index": 3, "meterset": 4.0, "gantry": 90.0})
    assert ctrl.recv(timeout=2).body == {"index": 3, "meterset": 4.0, "gantry": 90.0}
    assert_nothing_more_delivered(host, ctrl)
    assert ctrl.counters.duplicates == 2


def test_lost_ack_leads_to_a_retransmission_not_a_second_delivery(links):
    host, ctrl = links
    ctrl.transport.plan = [lambda data: []]  # the controller's first ACK is lost
    host.send(MessageType.HEARTBEAT, {})
    assert ctrl.recv(timeout=2).type == MessageType.HEARTBEAT
    assert host.counters.retransmits >= 1 and ctrl.counters.duplicates >= 1
    assert_nothing_more_delivered(host, ctrl)


def test_out_of_order_frame_is_dropped(links):
    host, ctrl = links
    ahead = encode(Frame(MessageType.METERSET, 40, {"meterset": 99.0}))
    host.transport.inner.write(ahead)  # a frame from the future, outside the protocol
    host.send(MessageType.METERSET, {"meterset": 1.0, "dose_rate": 600.0})
    assert ctrl.recv(timeout=2).body == {"meterset": 1.0, "dose_rate": 600.0}
    assert ctrl.counters.out_of_order == 1
    assert_nothing_more_delivered(host, ctrl)


def test_silent_peer_means_link_lost(links):
    host, ctrl = links
    ctrl.close()
    host.retry_timeout, host.retries = 0.05, 2
    with pytest.raises(LinkLost):
        for _ in range(3):
            host.send(MessageType.HEARTBEAT, {})


def test_both_directions_at_once(links):
    host, ctrl = links
    errors = []

    def pump(link, kind, count):
        try:
            for n in range(count):
                link.send(kind, {"n": n, "meterset": float(n), "dose_rate": 600.0})
        except LinkLost as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=pump, args=(host, MessageType.HEARTBEAT, 30)),
        threading.Thread(target=pump, args=(ctrl, MessageType.METERSET, 30)),
    ]
    for t in threads:
        t.start()
    got_ctrl = [ctrl.recv(timeout=5).body["n"] for _ in range(30)]
    got_host = [host.recv(timeout=5).body["n"] for _ in range(30)]
    for t in threads:
        t.join(timeout=10)
    assert errors == [] and got_ctrl == list(range(30)) == got_host
