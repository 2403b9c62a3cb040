"""Faults the reference TMS injects on request, for testing performing devices against a
TMS that refuses or answers late, the way a real one can (``tdw-emu tms --fault-...``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

REFUSE_ALWAYS = -1
HOLDABLE_STATES = ("IN PROGRESS", "COMPLETED", "CANCELED")


def parse_holds(items: list[str]) -> dict[str, float]:
    """``STATE=SECONDS`` items (``in-progress=90``, ``canceled=120``) as seconds by state."""
    holds = {}
    for item in items:
        name, _, seconds = str(item).partition("=")
        state = name.strip().upper().replace("-", " ").replace("_", " ")
        if state not in HOLDABLE_STATES:
            raise ValueError(f"{item!r}: the state is one of in-progress, completed, canceled")
        try:
            holds[state] = float(seconds)
        except ValueError as exc:
            raise ValueError(f"{item!r}: STATE=SECONDS, e.g. canceled=120") from exc
        if holds[state] < 0:
            raise ValueError(f"{item!r}: seconds must be 0 or more")
    return holds


@dataclass(frozen=True)
class TmsFaults:
    """What to inject. ``refuse_canceled``: refuse this many CANCELED transitions that
    would be accepted (REFUSE_ALWAYS: every one) with C304 and a comment saying so.
    ``hold_reply_s``: after accepting a change to a state (IN PROGRESS, COMPLETED or
    CANCELED), hold the N-ACTION reply this long: the reply of a claim arrives after the
    device's DIMSE timeout, or a device is killed between the TMS taking a final state and
    the device hearing so."""

    refuse_canceled: int = 0
    hold_reply_s: dict[str, float] = field(default_factory=dict)


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

    def hold_reply(self, state: str) -> None:
        """Blocks the association's thread before the reply to an accepted change to
        ``state``, until the hold is over or the TMS stops."""
        seconds = self.faults.hold_reply_s.get(state, 0.0)
        if seconds > 0:
            self._released.wait(seconds)

    def release(self) -> None:
        """Ends every hold now and from now on: the TMS is stopping."""
        self._released.set()
