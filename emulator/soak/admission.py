"""Admission control for a soak: no new session while the process is overloaded.

A fleet bigger than its machine makes its own latency: 200 real-time devices on 2 busy
cores saw DIMSE p99 of 25-50 s and a growing backlog, and then ended with UPS IN PROGRESS.
A soak tool must degrade instead: devices in a session finish it, and no device starts a
new one while the recent DIMSE latency or the results backlog is beyond the bounds in
profiles/soak.yaml. How long it held is part of the verdict, named as overload.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from emulator.metrics import RequestDone
from emulator.profile import load_yaml


@dataclass(frozen=True)
class AdmissionLimits:
    max_recent_p95_s: float = 5.0
    window: int = 200
    max_results_backlog: int = 200
    check_every_s: float = 1.0

    @classmethod
    def from_profile(cls) -> AdmissionLimits:
        return cls(**load_yaml("soak.yaml")["admission"])


class Admission:
    """The gate every device loop of one process passes before a worklist round."""

    def __init__(self, limits: AdmissionLimits, backlog: Callable[[], int]) -> None:
        self.limits = limits
        self.backlog = backlog
        self._recent: collections.deque[float] = collections.deque(maxlen=limits.window)
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self.held_s = 0.0
        self.holds = 0
        self.peak_p95_s = 0.0
        self.peak_backlog = 0
        self.why = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="soak-admission", daemon=True)

    def observe(self, done: RequestDone) -> None:
        """A request listener (Metrics.request_listeners): the devices' own requests."""
        if done.group == "performer" and done.role == "scu":
            with self._lock:
                self._recent.append(done.seconds)

    def recent_p95_s(self) -> float:
        with self._lock:
            samples = sorted(self._recent)
        if len(samples) < 20:
            return 0.0
        return samples[min(len(samples) - 1, int(0.95 * len(samples)))]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._open.set()

    def is_open(self) -> bool:
        """May a device start a new worklist round now?"""
        return self._open.is_set()

    def _watch(self) -> None:
        closed_at = None
        while not self._stop.wait(self.limits.check_every_s):
            p95, backlog = self.recent_p95_s(), self.backlog()
            self.peak_p95_s = max(self.peak_p95_s, p95)
            self.peak_backlog = max(self.peak_backlog, backlog)
            over = []
            if p95 > self.limits.max_recent_p95_s:
                over.append(f"recent DIMSE p95 {p95:.1f} s > {self.limits.max_recent_p95_s:g} s")
            if backlog > self.limits.max_results_backlog:
                over.append(f"results backlog {backlog} > {self.limits.max_results_backlog}")
            if over and self._open.is_set():
                self._open.clear()
                self.holds += 1
                self.why = "; ".join(over)
                closed_at = time.monotonic()
            elif not over and not self._open.is_set():
                self._open.set()
                self.held_s += time.monotonic() - (closed_at or time.monotonic())
                closed_at = None
        if closed_at is not None:
            self.held_s += time.monotonic() - closed_at

    def summary(self) -> dict:
        """What the verdict says of overload."""
        return {
            "holds": self.holds,
            "held_s": round(self.held_s, 1),
            "peak_recent_p95_ms": round(self.peak_p95_s * 1000, 1),
            "peak_results_backlog": self.peak_backlog,
            "why": self.why,
            "limits": {
                "max_recent_p95_s": self.limits.max_recent_p95_s,
                "max_results_backlog": self.limits.max_results_backlog,
            },
        }
