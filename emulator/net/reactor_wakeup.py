"""Wakes pynetdicom's two per-association loops on work instead of polling every 1 ms.

pynetdicom (3.0.4) runs two threads per association, and both poll: the association
reactor sleeps 1 ms between looks at its DIMSE queue, and the DUL reactor sleeps
``_run_loop_delay`` (1 ms) between looks at its socket and its queues. Idle, that is 2,000
wake-ups a second per association, each taking the GIL. Profiled with py-spy (``--gil``)
in the reference TMS process of a 200-device real-time soak: 43.5 % of the samples holding
the GIL were in the association reactor's ``time.sleep(0.001)`` line and 21.9 % in the
DUL's, so two thirds of the TMS's interpreter went to idle polling while DIMSE p99 was 6 s.

The guard keeps both loops as pynetdicom wrote them and changes only what their idle sleep
waits for:

- the association reactor waits on an Event that is set when the DUL hands it something
  (a DIMSE message, an A-RELEASE or A-ABORT indication), when a sender asks it to park
  (its checkpoint is cleared) or when it is killed;
- the DUL reactor waits in ``poll()`` on its socket and on a pipe written when a local
  thread queues a primitive or an event for it, or stops it.

Either wait ends after at most ``IDLE_WAIT_S`` whatever happens, so timers (ARTIM, the
idle timeout) are checked as before, only less often. Under gevent (Locust), where
pynetdicom's threads are greenlets whose sleeps already yield, nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import sys
import threading
import time as _time

from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul

from emulator.net.socket_ready_guard import READABLE

IDLE_WAIT_S = 0.05
_REACTOR_LOOP = _association.Association._run_reactor
_DUL_LOOP = _dul.DULServiceProvider.run_reactor
_originals: dict[str, object] = {}


class _Pipe:
    """A self-pipe a DUL thread can poll next to its socket; closed when the DUL ends."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._lock = threading.Lock()
        self.closed = False

    def wake(self) -> None:
        with self._lock:
            if not self.closed:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending
                    os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read_fd, 512):
                pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.read_fd)
                os.close(self.write_fd)


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _assoc_wake(assoc) -> None:
    event = getattr(assoc, "_tdw_wake", None)
    if event is not None:
        event.set()


def _dul_wake(dul) -> None:
    pipe = getattr(dul, "_tdw_pipe", None)
    if pipe is not None:
        pipe.wake()


# -- the waits ------------------------------------------------------------------------------


def _reactor_waited(thread) -> bool:
    """The association reactor's idle wait: for its Event. False if it has none."""
    event = getattr(thread, "_tdw_wake", None)
    if event is None:
        return False
    event.wait(IDLE_WAIT_S)
    event.clear()  # before the loop looks at its queues: no wake-up is lost
    return True


def _dul_waited(dul) -> bool:
    """The DUL's idle wait: for its socket or its pipe. False if it has no pipe."""
    pipe = getattr(dul, "_tdw_pipe", None)
    if pipe is None:
        return False
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted data waiting: poll() cannot see it
    poller = select.poll()
    poller.register(pipe.read_fd, select.POLLIN)
    if sock is not None:
        with contextlib.suppress(ValueError, OSError):  # closed: the loop will see it
            poller.register(sock, READABLE)
    poller.poll(IDLE_WAIT_S * 1000)
    pipe.drain()
    return True


class _IdleAwareTime:
    """``time`` as one pynetdicom module sees it: the idle sleep of ``loop`` waits for work
    instead (``wait``); every other use, in that loop or elsewhere, is the real ``time``."""

    def __init__(self, loop, wait) -> None:
        self._loop_code = loop.__code__
        self._wait = wait

    def __getattr__(self, name: str):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        in_loop = sys._getframe(1).f_code is self._loop_code
        if not (in_loop and self._wait(threading.current_thread())):
            _time.sleep(seconds)


# -- the wiring -----------------------------------------------------------------------------


class _Checkpoint(threading.Event):
    """The reactor's checkpoint, which also wakes it when cleared: every send_*() and
    release() clears it and then spins until the reactor has parked on it, which the
    reactor only does after its idle wait; unwoken, each exchange would wait that out."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


def _association_init(self, *args, **kwargs) -> None:
    self._tdw_wake = threading.Event()
    _originals["Association.__init__"](self, *args, **kwargs)
    checkpoint = _Checkpoint(self._tdw_wake)
    if self._reactor_checkpoint.is_set():
        checkpoint.set()
    self._reactor_checkpoint = checkpoint


def _association_kill(self) -> None:
    _assoc_wake(self)
    _originals["Association.kill"](self)


def _dimse_init(self, assoc) -> None:
    _originals["DIMSEServiceProvider.__init__"](self, assoc)
    self.msg_queue = _WakingQueue(lambda: _assoc_wake(assoc))


def _dul_init(self, assoc) -> None:
    _originals["DULServiceProvider.__init__"](self, assoc)
    pipe = self._tdw_pipe = _Pipe()
    self.event_queue = _WakingQueue(pipe.wake)
    self.to_provider_queue = _WakingQueue(pipe.wake)
    self.to_user_queue = _WakingQueue(lambda: _assoc_wake(assoc))


def _dul_run_reactor(self) -> None:
    try:
        _originals["DULServiceProvider.run_reactor"](self)
    finally:
        _assoc_wake(self.assoc)  # the association reactor checks dul.is_alive()
        self._tdw_pipe.close()


def _dul_kill(self) -> None:
    self._kill_thread = True
    _dul_wake(self)


def _dul_stop(self) -> bool:
    """pynetdicom's stop_dul, waking the reactor after the flag is set, not before."""
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _dul_wake(self)
        while self.is_alive():
            _time.sleep(self._run_loop_delay)
        return True
    return False


def _gevent_active() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    return bool(gevent_monkey and gevent_monkey.is_module_patched("threading"))


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement): everything the guard changes in pynetdicom."""
    association, dul, dimse = (
        _association.Association,
        _dul.DULServiceProvider,
        _dimse.DIMSEServiceProvider,
    )
    return [
        (association, "__init__", _association_init),
        (association, "kill", _association_kill),
        (dimse, "__init__", _dimse_init),
        (dul, "__init__", _dul_init),
        (dul, "run_reactor", _dul_run_reactor),
        (dul, "kill_dul", _dul_kill),
        (dul, "stop_dul", _dul_stop),
        (_association, "time", _IdleAwareTime(_REACTOR_LOOP, _reactor_waited)),
        (_dul, "time", _IdleAwareTime(_DUL_LOOP, _dul_waited)),
    ]


def _key(owner: object, name: str) -> str:
    return f"{getattr(owner, '__name__', owner)}.{name}"


def install() -> None:
    """Makes both loops wait for work (idempotent; nothing under gevent)."""
    if installed() or _gevent_active():
        return
    for owner, name, replacement in _patches():
        _originals[_key(owner, name)] = getattr(owner, name)
        setattr(owner, name, replacement)


def uninstall() -> None:
    """pynetdicom as it ships (for the tests and the benchmark that compare the two)."""
    if not installed():
        return
    for owner, name, _replacement in _patches():
        setattr(owner, name, _originals.pop(_key(owner, name)))


def installed() -> bool:
    return isinstance(_association.time, _IdleAwareTime)
