"""SIGINT and SIGTERM as a user means them: stop starting work, end what runs cleanly.

A Ctrl-C in the middle of a beam must not leave a UPS IN PROGRESS at the TMS, nor lose the
record of what the machine delivered. The first signal sets :attr:`GracefulStop.requested`
and calls every registered callback at once (a device holds its beam as an operator hold
does, stops taking new work); the command then finishes its current step the normal way:
the record stored, the UPS CANCELED with a coded reason, its reports written; and exits
130 with one sentence. A second signal exits at once: the device's journal (or the next
run's) finishes the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

# The shell's convention for "ended by SIGINT" (128 + 2), for SIGTERM too: a CI runner
# treats both as an interrupted job.
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """One command's stop: the signal that asked for it, and what to do at once."""

    def __init__(self, signals_to_exit: int = 2) -> None:
        """``signals_to_exit``: the signal that exits at once (the second, by default; a
        soak worker waits for a third, as its parent forwards a stop the terminal's
        Ctrl-C already gave it)."""
        self.signals_to_exit = signals_to_exit
        self._signals = 0
        self.event = threading.Event()
        self.signal_name = ""
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def reason(self) -> str:
        """Why the work stopped, for a UPS's Reason For Cancellation."""
        return f"the operator stopped the device ({self.signal_name or 'stop'})"

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs when the stop is asked (at once if it was already)."""
        with self._lock:
            self._callbacks.append(callback)
            already = self.event.is_set()
        if already:
            callback(self.reason)

    def request(self, signal_name: str = "stop") -> None:
        with self._lock:
            if self.event.is_set():
                return
            self.signal_name = signal_name
            self.event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(self.reason)

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        self._signals += 1
        if self.event.is_set() and self._signals < self.signals_to_exit:
            return
        if self.event.is_set():
            print(
                f"{name} again: exiting now; the device's journal ends what was left on its "
                "next start",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_INTERRUPTED)
        print(
            f"{name}: finishing the step in progress (the beam is held, the record stored, "
            f"the UPS ended); {name} again exits at once",
            file=sys.stderr,
            flush=True,
        )
        # The callbacks may talk to a machine or a socket: not from inside the handler.
        threading.Thread(target=self.request, args=(name,), daemon=True).start()

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """SIGINT and SIGTERM go to this stop while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
