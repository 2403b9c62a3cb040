"""Faults the reference TMS injects on request, for testing performing devices against a
TMS that refuses or answers late, the way a real one can (``tdw-emu tms --fault-...``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

REFUSE_ALWAYS = -1


@dataclass(frozen=True)
class TmsFaults:
    """What to inject. ``refuse_canceled``: refuse this many CANCELED transitions that
    would be accepted (REFUSE_ALWAYS: every one) with C304 and a comment saying so.
    ``hold_canceled_reply_s``: after accepting a CANCELED, hold the N-ACTION reply this
    long, so a device can be killed between the TMS taking the final state and the device
    hearing so."""

    refuse_canceled: int = 0
    hold_canceled_reply_s: float = 0.0


class FaultInjector:
    """The faults of one running TMS; the refusal count is shared by every association."""

    def __init__(self, faults: TmsFaults) -> None:
        self.faults = faults
        self._refusals_left = faults.refuse_canceled
        self._lock = threading.Lock()
        self._released = threading.Event()

    def refuse_cancel(self) -> bool:
        """Whether to refuse this acceptable CANCELED (counts it if so)."""
        with self._lock:
            if self._refusals_left == REFUSE_ALWAYS:
                return True
            if self._refusals_left > 0:
                self._refusals_left -= 1
                return True
            return False

    def hold_canceled_reply(self) -> None:
        """Blocks the association's thread before the reply to an accepted CANCELED, until
        the hold is over or the TMS stops."""
        if self.faults.hold_canceled_reply_s > 0:
            self._released.wait(self.faults.hold_canceled_reply_s)

    def release(self) -> None:
        """Ends every hold now and from now on: the TMS is stopping."""
        self._released.set()
