"""Time as the devices see it: real, scaled, or instant.

Tests run at time scale 0 and bench rigs at 1 with the same code: every wait goes through
a :class:`Clock`, never through ``time.sleep`` directly.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """``scale`` 1 is real time, 0.1 ten times faster, 0 as fast as possible."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale < 0:
            raise ValueError("time scale must be 0 or positive")
        self.scale = scale
        self._interrupt = threading.Event()

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> bool:
        """Waits ``seconds`` of device time; returns False if woken early by :meth:`wake`."""
        if seconds <= 0 or self.scale == 0:
            return not self._interrupt.is_set()
        return not self._interrupt.wait(seconds * self.scale)

    def sleep_until(self, origin: float, device_seconds: float) -> bool:
        """Waits until ``device_seconds`` of device time after ``origin`` (a now() value).

        Pacing against absolute deadlines keeps time spent elsewhere (sending events,
        waiting for ACKs) from accumulating as drift; returns False if woken early.
        """
        if self.scale == 0:
            return not self._interrupt.is_set()
        remaining = origin + device_seconds * self.scale - self.now()
        if remaining <= 0:
            return not self._interrupt.is_set()
        return not self._interrupt.wait(remaining)

    def wake(self) -> None:
        """Ends any current and future wait at once (an operator interrupt, a stop)."""
        self._interrupt.set()

    def reset(self) -> None:
        self._interrupt.clear()
