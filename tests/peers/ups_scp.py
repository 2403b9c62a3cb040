"""A strict, small UPS SCP: "a TMS written from PS3.4 Annex CC", with a UPS Event sender.

What it does, clause by clause:

* N-CREATE (CC.2.5): UPS Push context only; the SOP Instance UID comes from the command;
  Procedure Step State must be SCHEDULED (C309, Table CC.2.5-4); the Type 1 attributes of
  Table CC.2.5-3 must be valued (0120H/0121H), enumerated values valid (0106H); the data set
  must not carry SOP Class/Instance UID (0105H) nor a non-empty Transaction UID (0106H;
  Transaction UID is 2/2 and empty at creation); a second N-CREATE of a UID gets 0111H.
  Missing Type 2 attributes are accepted and recorded as warnings.
* C-FIND (CC.2.8): "Worklist" search with PS3.4 C.2.2.2 matching; only requested keys are
  returned (zero length when absent), never the Transaction UID; SOP Class UID = UPS Push.
* N-ACTION Change State (CC.2.1): Table CC.1.1-2 (:data:`.ups_rules.STATE_TABLE`) with the
  Final State requirements of CC.2.5.1.1; the performer supplies the Transaction UID
  (CC.2.1.2); it is never returned by N-GET or C-FIND (CC.2.7.3).
* N-ACTION Request Cancel (CC.2.2.3): SCHEDULED -> the SCP cancels it itself (IN PROGRESS,
  then CANCELED, meeting the Final State requirements); IN PROGRESS -> "UPS Cancel
  Requested" to the subscribers, C312 when nobody can be told; COMPLETED -> C311;
  CANCELED -> B304.
* N-SET (CC.2.6.3): IN PROGRESS needs the recorded Transaction UID (C301); SCHEDULED is
  accepted only without a Transaction UID (CC.2.6.2; C310 otherwise, dcm4chee-arc does the
  same); COMPLETED/CANCELED -> C300; Procedure Step State may not be set. Each accepted
  modification is kept with its monotonic arrival time.
* N-GET (CC.2.7): requested attributes, never the Transaction UID.
* Subscriptions (CC.2.3) per :data:`.ups_rules.SUBSCRIPTION_TABLE`; the Receiving AE of the
  Action Information is used (CC.2.3.3), unknown -> C308; filtered global -> C307; Suspend
  Global on an instance -> C314.
* Events (CC.2.4.3): sent by a background thread with Affected SOP Class UID = UPS Push on a
  UPS Event context, to the address of the Receiving AE in ``destinations``.
* CC.3.1: every N-ACTION, N-SET and N-GET must carry Requested SOP Class UID = UPS Push and
  every N-CREATE Affected SOP Class UID = UPS Push; otherwise 0118H "No such SOP Class" (the
  status dcm4che's ``DicomServiceRegistry`` answers when no service is registered for the
  class in the command; 0119H "Class-instance conflict" would also fit) and a
  :class:`Violation` naming the clause. A DIMSE service on a context whose SOP Class does not
  carry it (Tables CC.2-1 .. CC.2-5) gets 0211H "Unrecognized operation", as in dcm4chee-arc.
* A Storage SCP and a Study Root C-MOVE SCP (:mod:`.object_store`).

``violations`` lists breaches of an SCU "shall" that one message shows by itself (wrong SOP
Class, wrong service group, Table CC.2.5-3 attribute rules, Final State requirements not met
before a state change, Transaction UID requested in N-GET). Refusals the state table defines
(C300, C301, C302, ...) are only in ``requests``.
"""

from __future__ import annotations

import threading
import time
from copy import deepcopy
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom._handlers import standard_dimse_recv_handler

from . import ups_rules as rules
from .event_sender import EventSender, SentEvent
from .object_store import ObjectStore
from .ups_model import Outcome, UpsModel
from .ups_uids import STUDY_ROOT_MOVE, VERIFICATION, ActionType, UidSet, uid_set

STATE_TABLE = rules.STATE_TABLE  # Table CC.1.1-2 as data (defined in ups_rules)
SUBSCRIPTION_TABLE = rules.SUBSCRIPTION_TABLE  # Table CC.2.3-2 as data (defined in ups_rules)

_CLASS_CLAUSE = {
    "N-CREATE": "PS3.4 CC.3.1 / CC.2.5",
    "N-SET": "PS3.4 CC.3.1 / CC.2.6.2",
    "N-GET": "PS3.4 CC.3.1 / CC.2.7.2",
    ("N-ACTION", ActionType.CHANGE_STATE): "PS3.4 CC.3.1 / CC.2.1.2",
    ("N-ACTION", ActionType.REQUEST_CANCEL): "PS3.4 CC.3.1 / CC.2.2.2",
    ("N-ACTION", ActionType.SUBSCRIBE): "PS3.4 CC.3.1 / CC.2.3.2",
    ("N-ACTION", ActionType.UNSUBSCRIBE): "PS3.4 CC.3.1 / CC.2.3.2",
    ("N-ACTION", ActionType.SUSPEND_GLOBAL): "PS3.4 CC.3.1 / CC.2.3.2",
    "C-FIND": "PS3.4 CC.2.8.1.2.1",
}


@dataclass
class RequestRecord:
    """One request as it arrived, and the status answered (-1 while being processed)."""

    kind: str
    sop_class_uid: str  # Requested (N-SET/N-GET/N-ACTION) or Affected SOP Class UID
    context_uid: str  # abstract syntax of the presentation context it came on
    instance_uid: str
    action_type: int | None
    dataset: Dataset | None
    calling_ae: str
    time: float  # time.monotonic() at arrival
    status: int = -1
    error_comment: str = ""


@dataclass(frozen=True)
class Violation:
    clause: str
    message: str
    kind: str
    calling_ae: str
    time: float
    severity: str = "error"  # "error": refused when strict; "warning": accepted


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


class UpsScp:
    """The peer TMS. ``destinations`` maps AE titles to (host, port) for events and C-MOVE."""

    def __init__(
        self,
        ae_title: str = "TMS_SCP",
        uid_set: str | UidSet = "final",
        host: str = "127.0.0.1",
        port: int = 0,
        destinations: dict[str, tuple[str, int]] | None = None,
        strict_sop_class: bool = True,
        allow_set_on_scheduled: bool = True,
        require_performer_subscribed: bool = False,
        scp_generates_transaction_uid: bool = False,
        legacy_events: bool = False,
        worklist_label: str = "PEER TMS",
        event_timeout: float = 10.0,
    ) -> None:
        self.ae_title = ae_title
        self.uids = _resolve(uid_set)
        self.host, self._port = host, port
        self.destinations: dict[str, tuple[str, int]] = dict(destinations or {})
        self.strict_sop_class = strict_sop_class
        self.model = UpsModel(
            self.uids,
            self.destinations,
            allow_set_on_scheduled=allow_set_on_scheduled,
            require_performer_subscribed=require_performer_subscribed,
            scp_generates_transaction_uid=scp_generates_transaction_uid,
            worklist_label=worklist_label,
        )
        self.requests: list[RequestRecord] = []
        self.violations: list[Violation] = []
        self.store = ObjectStore(self.destinations)
        self.sender = EventSender(
            ae_title, self.uids, self.destinations, legacy_events, event_timeout
        )
        self._log_lock = threading.Lock()
        self._server = None
        self.ae = self._make_ae()

    # ================================================================== lifecycle
    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 20
        for uid in (*self.uids.all_ups, VERIFICATION, STUDY_ROOT_MOVE):
            if uid != self.uids.event:
                ae.add_supported_context(uid)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        if self.uids.rt_beams_delivery_instruction not in {
            str(cx.abstract_syntax) for cx in ae.supported_contexts
        }:
            ae.add_supported_context(self.uids.rt_beams_delivery_instruction)
        return ae

    def start(self) -> UpsScp:
        handlers = [
            (evt.EVT_ESTABLISHED, _without_recv_logging),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_N_CREATE, self._on_create),
            (evt.EVT_N_SET, self._on_set),
            (evt.EVT_N_GET, self._on_get),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        self.sender.start()
        self._server = self.ae.start_server(
            (self.host, self._port), block=False, evt_handlers=handlers
        )
        return self

    def stop(self) -> None:
        """Shut the server down, let queued events go out, and stop the sender thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.sender.stop()

    def __enter__(self) -> UpsScp:
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

    def add_destination(self, ae_title: str, host: str, port: int) -> None:
        self.destinations[ae_title] = (host, port)

    def add_object(self, ds: Dataset) -> None:
        """Keep ``ds`` for C-MOVE as if it had been stored."""
        self.store.add(ds)

    # ================================================================== inspection
    @property
    def ups(self) -> dict[str, Dataset]:
        return self.model.ups

    @property
    def worklist_label(self) -> str:
        return self.model.worklist_label

    def state_of(self, uid: str) -> str:
        with self.model.lock:
            return str(self.model.ups[uid].ProcedureStepState)

    def get_ups(self, uid: str) -> Dataset:
        with self.model.lock:
            return deepcopy(self.model.ups[uid])

    def subscription_state(self, ae_title: str, uid: str) -> str:
        with self.model.lock:
            return self.model.subscriptions.get(uid, {}).get(ae_title, rules.NOT_SUBSCRIBED)

    def global_state(self, ae_title: str) -> str:
        with self.model.lock:
            return self.model.global_subscriptions.get(ae_title, rules.NO_GLOBAL)

    def create_internal(self, uid: str, attributes: Dataset) -> None:
        """Create a UPS without a request (CC.2.5.3: "based on internal logic")."""
        with self.model.lock:
            events = self.model.add(uid, attributes)
        for item in events:
            self.sender.put(*item)

    def announce_status(self, scp_status: str, subscription_list_status: str | None = None) -> None:
        """Send SCP Status Change (Event Type 4, Table CC.2.4-1) to every subscriber."""
        with self.model.lock:
            events = self.model.status_change_events(scp_status, subscription_list_status)
        for item in events:
            self.sender.put(*item)

    def set_requests(
        self, uid: str | None = None, accepted_only: bool = True
    ) -> list[RequestRecord]:
        """N-SET requests in arrival order (their ``time`` is the monotonic arrival time)."""
        return [
            r
            for r in list(self.requests)
            if r.kind == "N-SET"
            and (uid is None or r.instance_uid == uid)
            and (not accepted_only or r.status == 0x0000)
        ]

    def progress_values(self, uid: str) -> list[float]:
        """Procedure Step Progress of each accepted N-SET of ``uid`` that carried one."""
        values = []
        for r in self.set_requests(uid):
            seq = r.dataset.get("ProcedureStepProgressInformationSequence") if r.dataset else None
            if seq and "ProcedureStepProgress" in seq[0]:
                values.append(float(seq[0].ProcedureStepProgress))
        return values

    @property
    def sent_events(self) -> list[SentEvent]:
        return list(self.sender.sent)

    def events_sent_to(self, ae_title: str, event_type: int | None = None) -> list[SentEvent]:
        return [
            e
            for e in self.sent_events
            if e.receiving_ae == ae_title and (event_type is None or e.event_type_id == event_type)
        ]

    def wait_events_sent(self, timeout: float = 10.0) -> bool:
        """Wait until the event queue is empty and nothing is being sent."""
        return self.sender.wait_idle(timeout)

    # ================================================================== bookkeeping
    def _begin(
        self,
        event: evt.Event,
        kind: str,
        sop_class: str,
        instance: str,
        action: int | None,
        ds: Dataset | None,
    ) -> RequestRecord:
        record = RequestRecord(
            kind=kind,
            sop_class_uid=str(sop_class or ""),
            context_uid=str(event.context.abstract_syntax),
            instance_uid=str(instance or ""),
            action_type=action,
            dataset=ds,
            calling_ae=str(event.assoc.requestor.ae_title),
            time=time.monotonic(),
        )
        with self._log_lock:
            self.requests.append(record)
        return record

    def _noter(self, record: RequestRecord):
        def note(clause: str, message: str, severity: str = "error") -> None:
            violation = Violation(
                clause, message, record.kind, record.calling_ae, time.monotonic(), severity
            )
            with self._log_lock:
                self.violations.append(violation)

        return note

    def _finish(self, record: RequestRecord, outcome: Outcome) -> Dataset:
        record.status, record.error_comment = outcome.status, outcome.comment
        for item in outcome.events:
            self.sender.put(*item)
        return _status(outcome.status, outcome.comment)

    def _check_class(self, record: RequestRecord) -> Outcome | None:
        """CC.3.1 and Tables CC.2-1 .. CC.2-5 for one request; None if it may proceed."""
        note = self._noter(record)
        context = self.uids.label(record.context_uid)
        action = record.action_type if record.kind == "N-ACTION" else None
        allowed = rules.SERVICE_GROUPS.get((record.kind, action))
        if allowed is not None and context not in allowed:
            note(
                "PS3.4 Tables CC.2-1 to CC.2-5",
                f"{record.kind} (action {action}) sent on a UPS {context} context",
            )
            if self.strict_sop_class:
                return Outcome(0x0211, f"{record.kind} not in the UPS {context} service group")
        expected = record.context_uid if record.kind == "C-FIND" else self.uids.push
        if record.sop_class_uid != expected:
            clause = _CLASS_CLAUSE.get((record.kind, action)) or _CLASS_CLAUSE.get(record.kind, "")
            what = "Affected" if record.kind in ("N-CREATE", "C-FIND") else "Requested"
            note(clause, f"{what} SOP Class UID {record.sop_class_uid} is not {expected}")
            if self.strict_sop_class:
                return Outcome(0x0118, f"{what} SOP Class UID must be {expected}")
        return None

    # ================================================================== handlers
    def _on_echo(self, event: evt.Event) -> int:
        record = self._begin(event, "C-ECHO", VERIFICATION, "", None, None)
        record.status = 0x0000
        return 0x0000

    def _on_create(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        req = event.request
        uid = str(req.AffectedSOPInstanceUID or "") or generate_uid()
        ds = _decode(lambda: event.attribute_list)
        record = self._begin(event, "N-CREATE", req.AffectedSOPClassUID, uid, None, ds)
        outcome = self._check_class(record)
        if outcome is None:
            with self.model.lock:
                outcome = self.model.create(uid, ds, self._noter(record))
        reply = None
        if outcome.status == 0x0000 and not req.AffectedSOPInstanceUID:
            reply = Dataset()  # PS3.7 10.1.5: the SCP assigned the UID, so it answers it
            reply.AffectedSOPInstanceUID = uid
        return self._finish(record, outcome), reply

    def _on_action(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        req = event.request
        action = int(req.ActionTypeID)
        uid = str(req.RequestedSOPInstanceUID)
        info = _decode(lambda: event.action_information)
        record = self._begin(event, "N-ACTION", req.RequestedSOPClassUID, uid, action, info)
        if action not in {a.value for a in ActionType}:
            return self._finish(record, Outcome(0x0123, f"no such action type {action}")), None
        outcome = self._check_class(record)
        if outcome is None:
            note = self._noter(record)
            with self.model.lock:
                if action == ActionType.CHANGE_STATE:
                    outcome = self.model.change_state(uid, info, record.calling_ae, note)
                elif action == ActionType.REQUEST_CANCEL:
                    outcome = self.model.request_cancel(uid, info, record.calling_ae)
                else:
                    outcome = self.model.subscription(ActionType(action), uid, info, note)
        return self._finish(record, outcome), outcome.reply

    def _on_set(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        req = event.request
        uid = str(req.RequestedSOPInstanceUID)
        mods = _decode(lambda: event.modification_list)
        record = self._begin(event, "N-SET", req.RequestedSOPClassUID, uid, None, mods)
        outcome = self._check_class(record)
        if outcome is None:
            with self.model.lock:
                outcome = self.model.set(uid, mods, self._noter(record))
        return self._finish(record, outcome), None

    def _on_get(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        req = event.request
        uid = str(req.RequestedSOPInstanceUID)
        tags = req.AttributeIdentifierList
        tags = [] if tags is None else (list(tags) if isinstance(tags, list) else [tags])
        record = self._begin(event, "N-GET", req.RequestedSOPClassUID, uid, None, None)
        outcome = self._check_class(record)
        if outcome is None:
            with self.model.lock:
                outcome = self.model.get(uid, [int(t) for t in tags], self._noter(record))
        return self._finish(record, outcome), outcome.reply

    def _on_find(self, event: evt.Event):
        req = event.request
        query = _decode(lambda: event.identifier)
        record = self._begin(event, "C-FIND", req.AffectedSOPClassUID, "", None, query)
        refusal = self._check_class(record)
        if refusal is not None:
            record.status = refusal.status
            yield refusal.status, None
            return
        if "TransactionUID" in query:
            self._noter(record)(
                "PS3.4 Table CC.2.5-3 (C-FIND)", "Transaction UID as a key", "warning"
            )
        with self.model.lock:
            found = self.model.find(query)
        for identifier in found:
            if event.is_cancelled:
                record.status = 0xFE00
                yield 0xFE00, None
                return
            yield 0xFF00, identifier
        record.status = 0x0000

    def _on_store(self, event: evt.Event) -> int:
        req = event.request
        record = self._begin(
            event, "C-STORE", req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, None, None
        )
        record.status = self.store.on_store(event)
        return record.status

    def _on_move(self, event: evt.Event):
        req = event.request
        identifier = _decode(lambda: event.identifier)
        record = self._begin(event, "C-MOVE", req.AffectedSOPClassUID, "", None, identifier)
        yield from self.store.on_move(event)
        record.status = 0x0000


def _without_recv_logging(event: evt.Event) -> None:
    """Drop pynetdicom's standard EVT_DIMSE_RECV logging handler from this association.

    In pynetdicom 3.0.4 that handler calls ``len()`` on the Attribute Identifier List of an
    N-GET-RQ, which decodes to a single tag when one attribute is asked for; the exception
    stops the acceptor from answering (the requestor then times out). A one-attribute N-GET
    is legal (PS3.7 10.3.2), so the handler goes.
    """
    event.assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)


def _decode(getter) -> Dataset:
    try:
        ds = getter()
    except Exception:  # absent or undecodable data set
        return Dataset()
    return ds if ds is not None else Dataset()


def _resolve(value: str | UidSet) -> UidSet:
    return uid_set(value)
