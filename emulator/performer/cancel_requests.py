"""Cancel requests a device hears of while it performs a UPS (PS3.4 CC.2.4 event type 2).

A therapist stops a treatment from the TMS: the TMS sends the performer (a subscriber of
the UPS) a UPS Cancel Requested. The device does not cancel mid-air: a beam that is on is
held through the device layer (an operator beam hold, so the machine's own count ends the
beam), and the workflow then stores the record of what was delivered and cancels the UPS
with the reason and a CID 9300 code, so the TMS can schedule the continuation. A request
that comes between beams or during a positioning step is honoured at the next safe point.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from emulator import ups_events
from emulator.net.event_scp import UpsEventNotice

LOG = logging.getLogger("tdw.device")


class CancelRequests:
    """What the TMS asked to cancel, and the hold of the beam of the UPS being performed."""

    def __init__(self, hold_beam: Callable[[str], None]) -> None:
        self.hold_beam = hold_beam
        self._requests: dict[str, str] = {}
        # Why, as a profiles/discontinuation_reasons.yaml cause: the TMS's request unless
        # the operator of this device stopped it (a signal).
        self._causes: dict[str, str] = {}
        self._performing: str | None = None
        self._lock = threading.Lock()
        # UPS whose final State Report (COMPLETED or CANCELED) this device has heard.
        self._final_reports: dict[str, threading.Event] = {}

    def on_event(self, notice: UpsEventNotice) -> None:
        """The receiver's callback for every UPS event addressed to this device: a Cancel
        Requested, or a State Report saying the TMS itself ended the UPS being performed
        (an operator's forced end, PS3.4 CC.2.1.3)."""
        if notice.event_type == ups_events.CANCEL_REQUESTED:
            requester = str(notice.info.get("RequestingAE", "") or notice.from_ae)
            reason = str(notice.info.get("ReasonForCancellation", "") or "no reason given")
            self._stop(notice.ups_uid, f"cancel requested by {requester}: {reason}")
        elif notice.event_type == ups_events.STATE_REPORT:
            state = str(notice.info.get("ProcedureStepState", "") or "")
            final = state in ("COMPLETED", "CANCELED")
            with self._lock:
                performing = self._performing == notice.ups_uid
                if final:
                    self._final_report(notice.ups_uid).set()
            if performing and final:
                reason = str(notice.info.get("ReasonForCancellation", "") or "")
                self._stop(
                    notice.ups_uid,
                    f"the TMS ended the UPS {state} while it was performed"
                    + (f": {reason}" if reason else ""),
                )

    def tms_ended(self, uid: str, text: str) -> None:
        """The TMS showed it no longer has ``uid`` IN PROGRESS for this device (it refused
        a progress report): as a cancel request, the beam is held."""
        self._stop(uid, text)

    def operator_stop(self, text: str) -> None:
        """This device's operator stopped it (SIGINT, SIGTERM): the UPS being performed is
        held and canceled as an operator hold."""
        with self._lock:
            uid = self._performing
        if uid is not None:
            self._stop(uid, text, cause="operator_hold")

    def _stop(self, uid: str, text: str, cause: str = "tms_request") -> None:
        with self._lock:
            self._requests[uid] = text
            self._causes[uid] = cause
            active = self._performing == uid
        LOG.warning("UPS %s: %s", uid, text)
        if active:
            self.hold_beam(text)

    @contextlib.contextmanager
    def performing(self, uid: str) -> Iterator[None]:
        """While the device performs ``uid``, a cancel request for it holds the beam."""
        with self._lock:
            self._performing = uid
        try:
            yield
        finally:
            with self._lock:
                self._performing = None

    def requested(self, uid: str) -> str | None:
        """Why the TMS asked to cancel ``uid``, if it did."""
        with self._lock:
            return self._requests.get(uid)

    def cause(self, uid: str) -> str:
        """The CID 9300 cause of the request for ``uid`` (tms_request or operator_hold)."""
        with self._lock:
            return self._causes.get(uid, "tms_request")

    def _final_report(self, uid: str) -> threading.Event:
        return self._final_reports.setdefault(uid, threading.Event())

    def wait_for_final_report(self, uid: str, seconds: float) -> bool:
        """Whether the TMS's State Report of the final state of ``uid`` came within
        ``seconds``. A subscriber that unsubscribed and stopped listening the moment its
        final N-ACTION was answered would leave the TMS an event it cannot deliver
        (PS3.4 CC.2.4.3 owes it to the subscriber of the state change)."""
        with self._lock:
            heard = self._final_report(uid)
        return heard.wait(seconds)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._requests.pop(uid, None)
            self._causes.pop(uid, None)
            self._final_reports.pop(uid, None)
