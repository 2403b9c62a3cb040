"""The link layer (hil/PROTOCOL.md, "Reliability") over a byte transport.

Stop and wait: one unacknowledged data frame at a time, resent every ``retry_s`` (200 ms)
up to ``retries`` (5) times, then the link is lost.  ACK and NAK are written at once and
never acknowledged.  Received data frames are classified against the expected sequence
number modulo 65536 (expected / duplicate / ahead); a HELLO with ``seq`` 0 resets both
counters before it is processed.  Only frames queued with ``coalesce=True`` (METERSET) are
replaced by a newer one while they still wait at the tail of the queue.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .framing import (
    SEQ_MODULO,
    Frame,
    FrameError,
    FrameSplitter,
    decode_frame,
    encode_frame,
    seq_relation,
)

RETRY_S = 0.2
RETRIES = 5


class Transport(Protocol):
    """A byte stream: ``read`` returns ``None`` on timeout and ``b""`` when it closed."""

    def read(self, timeout: float) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class TcpTransport:
    """A connected TCP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._closed = False

    def read(self, timeout: float) -> bytes | None:
        if self._closed:
            return b""
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):
            return b""
        if not ready:
            return None
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        if self._closed:
            raise OSError("transport closed")
        self.sock.settimeout(5.0)
        self.sock.sendall(data)

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            if abort:
                # a cut cable: no orderly shutdown
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class FdTransport:
    """A file descriptor (a pty master, a serial device); closing it is optional."""

    def __init__(self, fd: int, owns_fd: bool = False) -> None:
        self.fd = fd
        self.owns_fd = owns_fd
        self._closed = False
        os.set_blocking(fd, False)

    def read(self, timeout: float) -> bytes | None:
        if self._closed:
            return b""
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        except (OSError, ValueError):
            return b""
        if not ready:
            return None
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            # EIO on a pty master while nobody holds the slave: no data, not an end
            time.sleep(min(timeout, 0.05))
            return None
        return data if data else None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 5.0
        while view:
            if self._closed:
                raise OSError("transport closed")
            try:
                written = os.write(self.fd, view)
                view = view[written:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError("write timed out") from None
                select.select([], [self.fd], [], 0.05)

    def close(self, abort: bool = False) -> None:
        self._closed = True
        if self.owns_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)


@dataclass
class _Outgoing:
    name: str
    body: dict[str, Any]
    coalesce: bool = False
    seq: int = -1
    wire: bytes = b""
    attempts: int = 0
    deadline: float = 0.0
    sent_at: list[float] = field(default_factory=list)


class Link:
    """One side of the link layer.

    ``on_frame(frame)`` is called (from the reader thread) for every data frame to process,
    after its ACK went out.  ``on_session_reset()`` is called for a HELLO with ``seq`` 0
    before the counters are reset.  ``on_lost(reason)`` is called once when a frame got no
    ACK after its retries, when the transport closed or failed.  ``gate()`` returns False
    while the side must neither receive nor send (a stalled firmware, a dead line): frames
    received then are discarded, nothing is written, and the retransmission clock waits.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        on_frame: Callable[[Frame], None],
        on_lost: Callable[[str], None] | None = None,
        on_session_reset: Callable[[], None] | None = None,
        hello_resets: bool = True,
        gate: Callable[[], bool] | None = None,
        retry_s: float = RETRY_S,
        retries: int = RETRIES,
        name: str = "link",
    ) -> None:
        self.transport = transport
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.on_session_reset = on_session_reset
        self.hello_resets = hello_resets
        self.gate = gate or (lambda: True)
        self.retry_s = retry_s
        self.retries = retries
        self.name = name
        self.expected = 0
        self.next_seq = 0
        self.last_rx = time.monotonic()
        self.naks_sent: list[tuple[int, str]] = []
        self._splitter = FrameSplitter()
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._queue: deque[_Outgoing] = deque()
        self._outstanding: _Outgoing | None = None
        self._resend_now = False
        self._stopped = False
        self._lost = False
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-rx", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"{name}-tx", daemon=True)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> Link:
        self._reader.start()
        self._sender.start()
        return self

    def close(self, abort: bool = False) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        try:
            self.transport.close(abort=abort)  # type: ignore[call-arg]
        except TypeError:
            self.transport.close()
        self.closed.set()

    def reset(self) -> None:
        """A new session: both counters to 0, every unsent and unacknowledged frame dropped."""
        with self._cond:
            self.expected = 0
            self.next_seq = 0
            self._queue.clear()
            self._outstanding = None
            self._resend_now = False
            self._lost = False
            self._cond.notify_all()

    def flush_input(self) -> None:
        self._splitter.clear()

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._outstanding is None and not self._queue

    # -- sending ----------------------------------------------------------------------------

    def send(self, name: str, body: dict[str, Any], coalesce: bool = False) -> None:
        """Queue a data frame; with ``coalesce`` it replaces a same-type frame at the tail."""
        with self._cond:
            if self._stopped:
                return
            if coalesce and self._queue and self._queue[-1].name == name:
                self._queue[-1].body = body
            else:
                self._queue.append(_Outgoing(name, body, coalesce))
            self._cond.notify_all()

    def _write(self, wire: bytes) -> bool:
        try:
            with self._write_lock:
                self.transport.write(wire)
        except OSError as exc:
            self._declare_lost(f"write failed: {exc}")
            return False
        return True

    def _send_link_frame(self, name: str, seq: int, body: dict[str, Any]) -> None:
        if not self.gate():
            return
        self._write(encode_frame(name, seq, body))

    def _next_action(self) -> tuple[str, _Outgoing | None, int]:
        """Wait (holding the condition) for something to write, a loss or the end."""
        while True:
            if self._stopped:
                return "stop", None, 0
            if not self.gate():
                self._cond.wait(0.01)
                continue
            now = time.monotonic()
            out = self._outstanding
            if out is None and self._queue:
                out = self._queue.popleft()
                out.seq = self.next_seq
                self.next_seq = (self.next_seq + 1) % SEQ_MODULO
                out.wire = encode_frame(out.name, out.seq, out.body)
                self._outstanding = out
                return "send", out, out.seq
            if out is not None and (self._resend_now or now >= out.deadline):
                if out.attempts >= self.retries:
                    self._outstanding = None
                    return "lost", None, out.seq
                out.attempts += 1
                return "send", out, out.seq
            timeout = 0.5 if out is None else max(0.0, out.deadline - now)
            self._cond.wait(timeout)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                action, item, seq = self._next_action()
                if item is not None:
                    self._resend_now = False
                    item.deadline = time.monotonic() + self.retry_s
            if action == "stop":
                return
            if action == "lost" or item is None:
                self._declare_lost(f"no ACK for seq {seq} after {self.retries} retries")
                continue
            item.sent_at.append(time.monotonic())
            if not self._write(item.wire):
                continue
            with self._cond:
                if self._outstanding is item:
                    # the retry timeout runs from the end of the write
                    item.deadline = time.monotonic() + self.retry_s

    def _declare_lost(self, reason: str) -> None:
        with self._cond:
            if self._lost or self._stopped:
                return
            self._lost = True
        if self.on_lost is not None:
            self.on_lost(reason)

    # -- receiving --------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
            data = self.transport.read(0.05)
            if data is None:
                continue
            if data == b"":
                self._declare_lost("connection closed")
                with self._cond:
                    self._stopped = True
                    self._cond.notify_all()
                self.closed.set()
                return
            for chunk in self._splitter.feed(data):
                if not self.gate():
                    continue
                self._handle_chunk(chunk)

    def _nak(self, reason: str) -> None:
        with self._cond:
            expected = self.expected
        self.naks_sent.append((expected, reason))
        self._send_link_frame("NAK", expected, {"reason": reason})

    def _handle_chunk(self, chunk: bytes) -> None:
        try:
            frame = decode_frame(chunk)
        except FrameError as exc:
            self._nak(str(exc))
            return
        self.last_rx = time.monotonic()
        if frame.name == "ACK":
            with self._cond:
                out = self._outstanding
                if out is not None and out.seq == frame.seq:
                    self._outstanding = None
                    self._cond.notify_all()
            return
        if frame.name == "NAK":
            with self._cond:
                if self._outstanding is not None:
                    self._resend_now = True
                    self._cond.notify_all()
            return
        if self.hello_resets and frame.name == "HELLO" and frame.seq == 0:
            if self.on_session_reset is not None:
                self.on_session_reset()
            self.reset()
        with self._cond:
            relation = seq_relation(self.expected, frame.seq)
            if relation == "expected":
                self.expected = (self.expected + 1) % SEQ_MODULO
        if relation == "ahead":
            self._nak(f"out of order: seq {frame.seq}")
            return
        self._send_link_frame("ACK", frame.seq, {})
        if relation == "expected":
            self.on_frame(frame)
