"""A UPS Event receiver: the N-EVENT-REPORT end of PS3.4 CC.2.4 (CC.2.4.2 SCU behaviour).

Like tdwii_plus_examples ``upsneventreceiver.py`` it listens on the UPS Event presentation
context and answers every N-EVENT-REPORT; like dcm4che ``upsscu -O receive`` (which registers
its N-EVENT-REPORT handler under ``UID.UnifiedProcedureStepPush``) it expects the Affected SOP
Class UID to be UPS Push, because every UPS is a UPS Push instance (CC.2.4.3, CC.3.1). It also
accepts a context whose abstract syntax is UPS Push, for senders that propose that.

Every event is recorded (Event Type ID, Affected SOP Class/Instance UID, the Event
Information, the calling AE title, the context's abstract syntax and the monotonic receive
time). By default the answer is 0000H; ``require_push=True`` refuses other classes with 0118H
"No such SOP Class" (dcm4che's ``DicomServiceRegistry`` convention; tdwii answers 0122H).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from .ups_uids import VERIFICATION, EventType, UidSet, uid_set


@dataclass(frozen=True)
class ReceivedEvent:
    event_type_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    event_information: Dataset
    calling_ae: str
    context_uid: str
    received_at: float

    @property
    def type_name(self) -> str:
        try:
            return EventType(self.event_type_id).name
        except ValueError:
            return f"UNKNOWN({self.event_type_id})"


class EventReceiver:
    """A UPS Event receiver bound to ``host`` on a free port (``port=0``)."""

    def __init__(
        self,
        ae_title: str = "EVENT_RCV",
        uid_set: str | UidSet = "final",
        host: str = "127.0.0.1",
        port: int = 0,
        reply_status: int = 0x0000,
        require_push: bool = False,
    ) -> None:
        self.ae_title = ae_title
        self.uids = _resolve(uid_set)
        self.host, self._port = host, port
        self.reply_status = reply_status
        self.require_push = require_push
        self._events: list[ReceivedEvent] = []
        self._cond = threading.Condition()
        self.ae = AE(ae_title=ae_title)
        for uid in (self.uids.event, self.uids.push, VERIFICATION):
            self.ae.add_supported_context(uid)
        self._server = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EventReceiver:
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_event)]
        self._server = self.ae.start_server(
            (self.host, self._port), block=False, evt_handlers=handlers
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> EventReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # ------------------------------------------------------------------ handler
    def _on_event(self, event: evt.Event) -> tuple[int, None]:
        req = event.request
        try:
            info = event.event_information
        except Exception:  # no or undecodable Event Information
            info = Dataset()
        record = ReceivedEvent(
            event_type_id=int(req.EventTypeID),
            affected_sop_class_uid=str(req.AffectedSOPClassUID),
            affected_sop_instance_uid=str(req.AffectedSOPInstanceUID),
            event_information=info,
            calling_ae=str(event.assoc.requestor.ae_title),
            context_uid=str(event.context.abstract_syntax),
            received_at=time.monotonic(),
        )
        with self._cond:
            self._events.append(record)
            self._cond.notify_all()
        if self.require_push and record.affected_sop_class_uid != self.uids.push:
            return 0x0118, None
        return self.reply_status, None

    # ------------------------------------------------------------------ queries
    @property
    def events(self) -> list[ReceivedEvent]:
        with self._cond:
            return list(self._events)

    def events_for(self, uid: str, event_type: int | None = None) -> list[ReceivedEvent]:
        return [
            e
            for e in self.events
            if e.affected_sop_instance_uid == uid
            and (event_type is None or e.event_type_id == event_type)
        ]

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def wait_for(
        self, predicate: Callable[[ReceivedEvent], bool], timeout: float = 10.0
    ) -> ReceivedEvent | None:
        """The first recorded event satisfying ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self._events:
                    if predicate(e):
                        return e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def wait_for_count(
        self, predicate: Callable[[ReceivedEvent], bool], count: int, timeout: float = 10.0
    ) -> list[ReceivedEvent]:
        """Wait until ``count`` events satisfy ``predicate``; return those found."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self._events if predicate(e)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._cond.wait(remaining)


def _resolve(value: str | UidSet) -> UidSet:
    return uid_set(value)
