"""The link layer of protocol v2 (hil/PROTOCOL.md, Reliability): stop-and-wait ARQ.

Both ends use it: the host's serial and TCP drivers and the controller simulator. A reader
thread turns bytes into frames, acknowledges each in-order frame once, re-acknowledges
duplicates without delivering them, drops out-of-order and garbled frames with a NAK, and
counts all of it. ``send`` returns only once the peer acknowledged, or raises LinkLost.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import serial

from devices import schemas
from devices.protocol import (
    PROTOCOL_VERSION,
    Frame,
    FrameError,
    FrameReader,
    MessageType,
    encode,
)

LOG = logging.getLogger("tdw.link")


class LinkLost(ConnectionError):
    """The peer stopped acknowledging, or the transport closed."""


class Transport(Protocol):
    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class SerialTransport:
    """Any pyserial URL: a device path, ``loop://``, ``rfc2217://``, ``spy://``."""

    def __init__(self, url: str, **settings) -> None:
        """``settings`` are pyserial's (baudrate, bytesize, parity, stopbits, xonxoff,
        rtscts, dsrdtr); unset ones are 115200 8N1 without flow control."""
        self.port = serial.serial_for_url(url, **{"baudrate": 115200, **settings}, timeout=0.05)

    def read(self, size: int) -> bytes:
        """Waits up to the timeout for one byte, then takes what else is already there.

        pyserial's read(n) waits for all n bytes or the whole timeout, which added the full
        50 ms timeout to every frame (benchmarks/link_round_trip.py showed p50 50.8 ms).
        """
        try:
            first = self.port.read(1)
            if not first:
                return b""
            waiting = self.port.in_waiting
            return first + (self.port.read(min(waiting, size - 1)) if waiting else b"")
        except (TypeError, AttributeError) as exc:  # pyserial, once closed under a reader
            raise LinkLost("serial port closed") from exc

    def write(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def close(self) -> None:
        self.port.close()


class SocketTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(0.05)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 5.0) -> SocketTransport:
        return cls(socket.create_connection((host, port), timeout=timeout))

    def read(self, size: int) -> bytes:
        try:
            data = self.sock.recv(size)
        except TimeoutError:
            return b""
        if not data:
            raise LinkLost("peer closed the connection")
        return data

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass
class LinkCounters:
    sent: int = 0
    received: int = 0
    retransmits: int = 0
    garbled: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    naks_received: int = 0
    last_nak_seq: int | None = None  # the seq the peer said it expects (hil/PROTOCOL.md)
    extra: dict[str, int] = field(default_factory=dict)


class LinkObserver(Protocol):
    """Told of data frames, errors and round trips, e.g. to export them as metrics.

    ``direction`` is "sent" or "received"; ``kind`` one of retransmit, garbled, duplicate,
    out_of_order, nak, lost. Called on the link's threads, so it must not block.
    """

    def link_frame(self, direction: str) -> None: ...
    def link_error(self, kind: str) -> None: ...
    def link_round_trip(self, seconds: float) -> None: ...


class _Unobserved:
    def link_frame(self, direction: str) -> None:
        pass

    def link_error(self, kind: str) -> None:
        pass

    def link_round_trip(self, seconds: float) -> None:
        pass


class Link:
    """One end of a link. ``recv`` yields the peer's data frames, in order, once each."""

    def __init__(
        self,
        transport: Transport,
        retry_timeout: float = 0.2,
        retries: int = 5,
        observer: LinkObserver | None = None,
        validate: bool | None = None,
    ):
        """``validate`` checks every data frame's body against hil/schemas (default: the
        TDW_VALIDATE_FRAMES environment flag); a body that breaks it is not sent, and is
        refused like a garbled frame when received."""
        self.validate = schemas.validation_enabled() if validate is None else validate
        self.transport = transport
        self.observer = observer or _Unobserved()
        self.retry_timeout = retry_timeout
        self.retries = retries
        self.counters = LinkCounters()
        self.last_received = time.monotonic()
        self._reader = FrameReader()
        self._inbox: queue.Queue[Frame] = queue.Queue()
        self._send_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._next_seq = 0
        self._expected = 0
        self._acked = threading.Condition()
        self._last_ack: int | None = None
        self._nak = False
        self.closed = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._read_loop, daemon=True, name="link-reader")
        self._thread.start()

    # -- receiving -------------------------------------------------------------------------

    def _write(self, frame: Frame) -> None:
        with self._write_lock:
            self.transport.write(encode(frame))

    def _control(self, kind: MessageType, seq: int, **body: Any) -> None:
        with contextlib.suppress(OSError, LinkLost, serial.SerialException):
            self._write(Frame(kind, seq, body))

    def _read_loop(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.transport.read(4096)
                if not data:
                    continue
                for item in self._reader.feed(data):
                    self._handle(item)
        except (OSError, LinkLost, serial.SerialException) as exc:
            self.error = exc
        finally:
            self.closed.set()
            with self._acked:
                self._acked.notify_all()

    def _handle(self, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            self.counters.garbled += 1
            self.observer.link_error("garbled")
            self._control(MessageType.NAK, self._expected, reason=str(item)[:60])
            return
        self.last_received = time.monotonic()
        if item.type == MessageType.ACK:
            with self._acked:
                self._last_ack = item.seq
                self._acked.notify_all()
            return
        if item.type == MessageType.NAK:
            self.counters.naks_received += 1
            self.counters.last_nak_seq = item.seq
            self.observer.link_error("nak")
            with self._acked:
                self._nak = True
                self._acked.notify_all()
            return
        if item.type == MessageType.HELLO and item.seq == 0:
            # A new session (the host reconnected on a line that stayed up): start over.
            self._expected = 0
            with self._acked:
                self._next_seq = 0
        if item.seq == self._expected:
            broken = schemas.problems(item.type, item.body) if self._judged(item) else []
            if broken:
                # Intact on the wire, wrong in content: a protocol error for the receiver to
                # act on (a NAK would only bring the same frame again), counted and logged.
                self.counters.extra["schema"] = self.counters.extra.get("schema", 0) + 1
                LOG.error("received %s breaking its schema: %s", item.type.name, broken)
            self._control(MessageType.ACK, item.seq)
            self._expected = (self._expected + 1) & 0xFFFF
            self.counters.received += 1
            self.observer.link_frame("received")
            self._inbox.put(item)
        elif ((self._expected - item.seq) & 0xFFFF) < 0x8000:
            self.counters.duplicates += 1  # already delivered: acknowledge again only
            self.observer.link_error("duplicate")
            self._control(MessageType.ACK, item.seq)
        else:
            self.counters.out_of_order += 1
            self.observer.link_error("out_of_order")
            self._control(MessageType.NAK, self._expected, reason="out of order")

    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next data frame, or None after ``timeout`` (raises LinkLost if closed)."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            if self.closed.is_set():
                raise LinkLost(f"link closed: {self.error}") from self.error
            return None

    # -- sending ---------------------------------------------------------------------------

    def _judged(self, item: Frame) -> bool:
        """Whether a received body is held to hil/schemas: they are version 2's, so a
        HELLO_REPLY of another version passes through for the host to refuse in words."""
        if not self.validate:
            return False
        other_version = item.body.get("protocol") != PROTOCOL_VERSION
        return not (item.type == MessageType.HELLO_REPLY and other_version)

    @property
    def next_seq(self) -> int:
        """The sequence number this side's next data frame will carry."""
        return self._next_seq

    def send(self, kind: MessageType, body: dict[str, Any] | None = None) -> int:
        """Sends one frame and waits for its ACK, retransmitting; raises LinkLost."""
        if self.validate:
            schemas.check(kind, body or {})
        with self._send_lock:
            seq = self._next_seq
            self._next_seq = (seq + 1) & 0xFFFF
            frame = Frame(kind, seq, body or {})
            for attempt in range(self.retries + 1):
                if self.closed.is_set():
                    self.observer.link_error("lost")
                    raise LinkLost(f"link closed: {self.error}")
                with self._acked:
                    self._nak = False
                written = time.perf_counter()
                try:
                    self._write(frame)
                except (OSError, serial.SerialException) as exc:
                    self.observer.link_error("lost")
                    raise LinkLost(f"write failed: {exc}") from exc
                self.counters.sent += 1
                self.observer.link_frame("sent")
                if attempt:
                    self.counters.retransmits += 1
                    self.observer.link_error("retransmit")
                deadline = time.monotonic() + self.retry_timeout
                with self._acked:
                    while self._last_ack != seq and not self._nak and not self.closed.is_set():
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._acked.wait(remaining)
                    if self._last_ack == seq:
                        self.observer.link_round_trip(time.perf_counter() - written)
                        return seq
            self.observer.link_error("lost")
            raise LinkLost(f"no ACK for frame {seq} after {self.retries} retries")

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError, serial.SerialException):
            self.transport.close()
        self._thread.join(timeout=2)


class FdTransport:
    """A raw file descriptor, e.g. the master side of a pty the controller simulator owns."""

    def __init__(self, fd: int) -> None:
        import os

        self.fd = fd
        self._os = os

    def read(self, size: int) -> bytes:
        import select

        poller = select.poll()  # not select(): no FD_SETSIZE limit in a busy process
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(50):
            return b""
        try:
            data = self._os.read(self.fd, size)
        except OSError as exc:  # EIO once the other side is closed
            raise LinkLost(f"pty closed: {exc}") from exc
        if not data:
            raise LinkLost("pty closed")
        return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._os.write(self.fd, view)
            view = view[written:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._os.close(self.fd)
