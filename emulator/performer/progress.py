"""RO-26 progress of one claimed step: the share of its work done, told to the TMS.

A TMS console shows a treatment's progress from these N-SETs, and the TMS's UPS Progress
Reports follow them (PS3.4 CC.2.4.3). The share is measured, never estimated: for a
delivery the meterset the machine reported over the fraction's total, for an acquisition
the share of the scan the machine reported. It is sent when a beam starts (with the
Referenced Beam Number in Progress) and at least every ``report_every_s`` of
``profiles/progress.yaml`` while the machine reports more, always rising.

Reports during a beam leave from a thread of their own, so a slow TMS never holds the
machine's events back; a beam start waits for its report, as a TMS that refuses it no
longer has the UPS IN PROGRESS for this device and no further beam may start.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from emulator.profile import load_yaml

LOG = logging.getLogger("tdw.device")

# Sends one progress N-SET (percent, beam number in progress or None, a description) and
# returns its status.
Send = Callable[[float, int | None, str], int]


@functools.cache
def report_every_s() -> float:
    return float(load_yaml("progress.yaml")["report_every_s"])


class ProgressRefused(Exception):
    """The TMS refused a progress report: it no longer has the UPS IN PROGRESS for us."""

    def __init__(self, status: int, percent: float) -> None:
        super().__init__(f"RO-26: progress update refused (0x{status:04X})")
        self.status = status
        self.percent = percent


class ProgressReporter:
    """Every progress report of one claimed step, in rising order.

    ``on_refused`` is told (status) when a report sent from the background thread is
    refused, so the beam can be held at once rather than at the next beam start.
    """

    def __init__(
        self,
        send: Send,
        every_s: float | None = None,
        on_refused: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.every_s = report_every_s() if every_s is None else float(every_s)
        self.on_refused = on_refused or (lambda status: None)
        self.clock = clock
        self.sent: list[float] = []  # the percentages the TMS accepted, in order
        self.refused: ProgressRefused | None = None
        self._last_sent_at = clock()
        self._last_beam: int | None = None
        self._offered: float | None = None
        self._send_lock = threading.Lock()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def last(self) -> float:
        return self.sent[-1] if self.sent else -1.0

    def report_now(self, percent: float, beam: int | None = None, description: str = "") -> None:
        """Sends ``percent`` (with the beam now starting, or a description) and waits for the
        answer; raises :class:`ProgressRefused` when the TMS refuses it. A value below what
        was reported already is reported as it stands: the progress never falls."""
        if self.refused is not None:
            raise self.refused
        self._deliver(max(percent, self.last, 0.0), beam, description)
        if self.refused is not None:
            raise self.refused

    def offer(self, percent: float) -> None:
        """What the machine has done so far; sent from the background thread when it is
        more than was reported and ``every_s`` has passed since the last report."""
        with self._wake:
            self._offered = percent
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="ro26-progress", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        """No more reports from the background; waits for one under way."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(30.0)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._due():
                    wait = self.every_s - (self.clock() - self._last_sent_at)
                    self._wake.wait(max(wait, 0.05) if self._offered is not None else None)
                if self._closed:
                    return
                percent, self._offered = self._offered, None
            if percent is not None and percent > self.last:
                self._deliver(percent, None)
                if self.refused is not None:
                    self.on_refused(self.refused.status)
                    return

    def _due(self) -> bool:
        return (
            self._offered is not None
            and self._offered > self.last
            and self.clock() - self._last_sent_at >= self.every_s
        )

    def _deliver(self, percent: float, beam: int | None, description: str = "") -> None:
        percent = round(min(percent, 100.0), 2)
        with self._send_lock:
            same = percent == self.last and beam in (None, self._last_beam) and not description
            if percent < self.last or same:
                return  # a new beam starting, or a description, is told even at the same share
            status = self.send(percent, beam, description)
            self._last_sent_at = self.clock()
            if status == 0x0000:
                self.sent.append(percent)
                self._last_beam = beam if beam is not None else self._last_beam
            else:
                self.refused = ProgressRefused(status, percent)
                LOG.warning("%s at %.2f %%", self.refused, percent)
