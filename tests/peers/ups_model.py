"""The worklist behind the peer TMS: UPS instances, their states and subscriptions.

No networking here. Each operation answers an :class:`Outcome` (status, Error Comment, reply
data set, and the N-EVENT-REPORTs to send) and reports breaches of an SCU "shall" through
``note(clause, message, severity)``. Callers hold the model's lock (:attr:`UpsModel.lock`).

* N-CREATE: PS3.4 CC.2.5.3, Table CC.2.5-3 (N-CREATE column), Table CC.2.5-4.
* Change State: CC.2.1.3, Table CC.1.1-2, Table CC.2.1-2, Final State (CC.2.5.1.1).
* Request Cancel: CC.2.2.3, Table CC.2.2-2.
* (Un)subscribe / suspend: CC.2.3.3, Table CC.2.3-2, Table CC.2.3-3.
* N-SET: CC.2.6.2 / CC.2.6.3, Table CC.2.6-1. N-GET: CC.2.7.3. C-FIND: CC.2.8.3.
* Events: CC.2.4.3.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from . import ups_rules as rules
from .event_sender import (
    assigned_info,
    cancel_requested_info,
    progress_report_info,
    scp_status_info,
    state_report_info,
)
from .ups_uids import (
    CANCELED,
    COMPLETED,
    FILTERED_GLOBAL_SUBSCRIPTION,
    GLOBAL_SUBSCRIPTION,
    IN_PROGRESS,
    SCHEDULED,
    STATES,
    ActionType,
    EventType,
    UidSet,
)

Note = Callable[..., None]  # note(clause, message, severity="error")
PendingEvent = tuple[str, int, str, Dataset]  # (receiving AE, event type, UPS UID, info)

_STATUS_TEXT = {
    0xB304: "The UPS is already in the requested state of CANCELED",
    0xB306: "The UPS is already in the requested state of COMPLETED",
    0xC300: "The UPS may no longer be updated",
    0xC301: "The correct Transaction UID was not provided",
    0xC302: "The UPS is already IN PROGRESS",
    0xC303: "The UPS may only become SCHEDULED via N-CREATE",
    0xC310: "The UPS is not yet in the IN PROGRESS state",
}


@dataclass
class Outcome:
    status: int
    comment: str = ""
    reply: Dataset | None = None
    events: list[PendingEvent] = field(default_factory=list)


def now_dt() -> str:
    return datetime.now().strftime("%Y%m%d%H%M%S")


def invalid_enums(ds: Dataset) -> list[str]:
    return [
        k
        for k, allowed in rules.ENUMERATED_VALUES.items()
        if ds.get(k) and str(ds[k].value) not in allowed
    ]


class UpsModel:
    """UPS instances by SOP Instance UID, with Transaction UIDs and subscriptions."""

    def __init__(
        self,
        uids: UidSet,
        known_aes: dict[str, tuple[str, int]],
        allow_set_on_scheduled: bool = True,
        require_performer_subscribed: bool = False,
        scp_generates_transaction_uid: bool = False,
        worklist_label: str = "PEER TMS",
    ) -> None:
        self.uids = uids
        self.known_aes = known_aes
        self.allow_set_on_scheduled = allow_set_on_scheduled
        self.require_performer_subscribed = require_performer_subscribed
        self.scp_generates_transaction_uid = scp_generates_transaction_uid
        self.worklist_label = worklist_label
        self.ups: dict[str, Dataset] = {}
        self.transaction_uids: dict[str, str] = {}
        self.performers: dict[str, str] = {}  # UPS UID -> AE title that claimed it
        self.subscriptions: dict[str, dict[str, str]] = {}  # UPS UID -> {AE: state}
        self.global_subscriptions: dict[str, str] = {}  # AE -> Global Subscription State
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ helpers
    def subscribers(self, uid: str) -> list[str]:
        return list(self.subscriptions.get(uid, {}))

    def _to_subscribers(self, kind: EventType, uid: str, info: Dataset) -> list[PendingEvent]:
        return [(ae, int(kind), uid, info) for ae in self.subscribers(uid)]

    def _state_reports(self, uid: str) -> list[PendingEvent]:
        return self._to_subscribers(EventType.STATE_REPORT, uid, state_report_info(self.ups[uid]))

    # ------------------------------------------------------------------ N-CREATE
    def create(self, uid: str, ds: Dataset, note: Note) -> Outcome:
        """CC.2.5.3 with Table CC.2.5-3 (N-CREATE column) and Table CC.2.5-4."""
        refusal = self._create_refusal(ds, note)
        if refusal is not None:
            return refusal
        missing2 = [k for k in rules.TYPE2_AT_CREATE if k not in ds]
        if missing2:
            note("PS3.4 Table CC.2.5-3 (N-CREATE)", f"missing Type 2: {missing2}", "warning")
        if uid in self.ups:
            return Outcome(0x0111, "a UPS with this SOP Instance UID exists")
        return Outcome(0x0000, events=self.add(uid, ds))

    @staticmethod
    def _create_refusal(ds: Dataset, note: Note) -> Outcome | None:
        table = "PS3.4 Table CC.2.5-3 (N-CREATE)"
        present = [k for k in rules.NOT_ALLOWED_AT_CREATE if k in ds]
        if present:
            note(table, f"not allowed: {present}")
            return Outcome(0x0105, f"not allowed in N-CREATE: {', '.join(present)}")
        if ds.get("TransactionUID"):
            note(table, "Transaction UID has a value")
            return Outcome(0x0106, "Transaction UID shall be empty at creation")
        if ds.get("ProcedureStepState") != SCHEDULED:
            note("PS3.4 CC.2.5.3", "Procedure Step State is not SCHEDULED")
            return Outcome(0xC309, "The provided value of UPS State was not SCHEDULED")
        missing = [k for k in rules.TYPE1_AT_CREATE if k not in ds]
        if missing:
            note(table, f"missing Type 1: {missing}")
            return Outcome(0x0120, f"missing: {', '.join(missing)}")
        empty = rules.empty_keywords(ds, rules.TYPE1_AT_CREATE)
        if empty:
            note(table, f"empty Type 1: {empty}")
            return Outcome(0x0121, f"no value: {', '.join(empty)}")
        invalid = invalid_enums(ds)
        if invalid:
            note(f"{table} / PS3.3 C.30.2", f"invalid: {invalid}")
            return Outcome(0x0106, f"invalid value: {', '.join(invalid)}")
        return None

    def add(self, uid: str, ds: Dataset) -> list[PendingEvent]:
        """Keep a new SCHEDULED UPS; subscribe the global subscribers (CC.2.5.3, CC.2.4.3)."""
        ups = deepcopy(ds)
        for keyword in ("TransactionUID", "SOPInstanceUID", "SOPClassUID"):
            if keyword in ups:
                del ups[keyword]
        ups.SOPClassUID = self.uids.push
        ups.SOPInstanceUID = uid
        ups.ProcedureStepState = SCHEDULED
        if not ups.get("WorklistLabel"):
            ups.WorklistLabel = self.worklist_label  # Table CC.2.5-3: 2/1
        ups.ScheduledProcedureStepModificationDateTime = now_dt()
        self.ups[uid] = ups
        self.subscriptions[uid] = {}
        events: list[PendingEvent] = []
        assigned = assigned_info(ups)
        for ae, global_state in self.global_subscriptions.items():
            lock = "with Lock" if global_state == rules.GLOBAL_WITH_LOCK else "w/o Lock"
            row = rules.SUBSCRIPTION_TABLE[f"UPS created, Global Subscription {lock}"]
            new_state, report = row.instance[rules.NOT_SUBSCRIBED]
            self.subscriptions[uid][ae] = new_state
            if report:
                events.append((ae, EventType.STATE_REPORT, uid, state_report_info(ups)))
                if assigned is not None:
                    events.append((ae, EventType.ASSIGNED, uid, assigned))
        return events

    # ------------------------------------------------------------------ Change State
    def change_state(self, uid: str, info: Dataset, calling_ae: str, note: Note) -> Outcome:
        """CC.2.1.3 with Table CC.1.1-2 (:data:`.ups_rules.STATE_TABLE`)."""
        ups = self.ups.get(uid)
        if ups is None:
            return Outcome(0xC307, "no such UPS")
        requested = str(info.get("ProcedureStepState", ""))
        if requested not in STATES:
            return Outcome(0x0115, f"Procedure Step State {requested!r} is not valid")
        current = str(ups.ProcedureStepState)
        given = str(info.get("TransactionUID", "") or "")
        reply = None
        if self.scp_generates_transaction_uid and not given and requested == IN_PROGRESS:
            given = generate_uid()  # IHE-RO 2008 RO-19 variant (spec-notes.md)
            reply = Dataset()
            reply.TransactionUID = given
        recorded = self.transaction_uids.get(uid)
        action = rules.state_transition(
            current, requested, rules.classify_transaction_uid(given, recorded)
        )
        if isinstance(action, int):
            return Outcome(action, _STATUS_TEXT.get(action, ""))
        if action == rules.RECORD_TRANSACTION_UID:
            self.transaction_uids[uid] = given
            self.performers[uid] = calling_ae
        else:
            unmet = rules.unmet_final_state(ups, requested)
            if unmet:
                note("PS3.4 CC.2.5.1.1 / CC.2.6.2", f"{requested}: unmet {unmet}")
                return Outcome(0xC304, "Final State requirements not met (CC.2.5.1.1)")
        ups.ProcedureStepState = requested
        ups.ScheduledProcedureStepModificationDateTime = now_dt()
        return Outcome(0x0000, reply=reply, events=self._state_reports(uid))

    # ------------------------------------------------------------------ Request Cancel
    def request_cancel(self, uid: str, info: Dataset, calling_ae: str) -> Outcome:
        """CC.2.2.3 with the statuses of Table CC.2.2-2 (C313 never: the SCP never performs)."""
        ups = self.ups.get(uid)
        if ups is None:
            return Outcome(0xC307, "no such UPS")
        state = str(ups.ProcedureStepState)
        if state == COMPLETED:
            return Outcome(0xC311, "The UPS is already COMPLETED")
        if state == CANCELED:
            return Outcome(0xB304, "The UPS is already CANCELED")
        if state == SCHEDULED:
            return Outcome(0x0000, events=self._cancel_scheduled(uid, info))
        subscribers = self.subscribers(uid)
        performer = self.performers.get(uid)
        if not subscribers or (self.require_performer_subscribed and performer not in subscribers):
            return Outcome(0xC312, "The performer cannot be contacted")
        event_info = cancel_requested_info(calling_ae, info)
        return Outcome(
            0x0000, events=self._to_subscribers(EventType.CANCEL_REQUESTED, uid, event_info)
        )

    def _cancel_scheduled(self, uid: str, info: Dataset) -> list[PendingEvent]:
        """A SCHEDULED UPS goes IN PROGRESS, then CANCELED, meeting Final State "X"."""
        ups = self.ups[uid]
        item = Dataset()
        item.ProcedureStepCancellationDateTime = now_dt()
        codes = info.get("ProcedureStepDiscontinuationReasonCodeSequence")
        if codes:
            item.ProcedureStepDiscontinuationReasonCodeSequence = deepcopy(codes)
        else:  # dcm4chee-arc's choice when no reason is given
            item.ProcedureStepDiscontinuationReasonCodeSequence = [
                rules.code_item("110513", "DCM", "Discontinued for unspecified reason")
            ]
        if info.get("ReasonForCancellation"):
            item.ReasonForCancellation = info.ReasonForCancellation
        if info.get("ContactURI"):
            contact = Dataset()
            contact.ContactURI = info.ContactURI
            if info.get("ContactDisplayName"):
                contact.ContactDisplayName = info.ContactDisplayName
            item.ProcedureStepCommunicationsURISequence = [contact]
        ups.ProcedureStepProgressInformationSequence = [item]
        ups.ProcedureStepState = IN_PROGRESS
        events = self._state_reports(uid)
        ups.ProcedureStepState = CANCELED
        ups.ScheduledProcedureStepModificationDateTime = now_dt()
        return events + self._state_reports(uid)

    # ------------------------------------------------------------------ subscriptions
    def subscription(self, action: ActionType, uid: str, info: Dataset, note: Note) -> Outcome:
        """CC.2.3.3 with Table CC.2.3-2 and the statuses of Table CC.2.3-3."""
        receiving = str(info.get("ReceivingAE", "") or "").strip()
        if not receiving:
            note("PS3.4 Table CC.2.3-1", "Receiving AE missing")
            return Outcome(0x0115, "Receiving AE is required")
        lock = None
        if action == ActionType.SUBSCRIBE:
            lock = str(info.get("DeletionLock", "")).strip().upper()
            if lock not in ("TRUE", "FALSE"):
                note("PS3.4 Table CC.2.3-1", f"Deletion Lock {lock!r}")
                return Outcome(0x0115, "Deletion Lock shall be TRUE or FALSE")
        if uid == FILTERED_GLOBAL_SUBSCRIPTION:
            return Outcome(0xC307, "Filtered Global Subscription is not supported")
        if receiving not in self.known_aes:
            return Outcome(0xC308, f"Receiving AE {receiving} is unknown")
        if uid == GLOBAL_SUBSCRIPTION:
            name = {
                ActionType.SUBSCRIBE: f"Subscribe Globally (Lock {lock})",
                ActionType.UNSUBSCRIBE: "Unsubscribe Globally",
                ActionType.SUSPEND_GLOBAL: "Suspend Global Subscription",
            }[action]
            scope = list(self.ups)
        else:
            if uid not in self.ups:
                return Outcome(0xC307, "no such UPS")
            if action == ActionType.SUSPEND_GLOBAL:
                return Outcome(0xC314, "Suspend Global needs the well-known UID")
            name = (
                f"Subscribe (instance, Lock {lock})"
                if action == ActionType.SUBSCRIBE
                else "Unsubscribe (instance)"
            )
            scope = [uid]
        return Outcome(0x0000, events=self._apply_subscription(name, receiving, scope))

    def _apply_subscription(self, name: str, ae: str, scope: list[str]) -> list[PendingEvent]:
        row = rules.SUBSCRIPTION_TABLE[name]
        if row.new_global_state == rules.NO_GLOBAL:
            self.global_subscriptions.pop(ae, None)
        elif row.new_global_state is not None:
            self.global_subscriptions[ae] = row.new_global_state
        events: list[PendingEvent] = []
        for uid in scope:
            subs = self.subscriptions.setdefault(uid, {})
            new_state, report = row.instance[subs.get(ae, rules.NOT_SUBSCRIBED)]
            if new_state == rules.NOT_SUBSCRIBED:
                subs.pop(ae, None)
            else:
                subs[ae] = new_state
            if report:
                events.append((ae, EventType.STATE_REPORT, uid, state_report_info(self.ups[uid])))
        return events

    def status_change_events(self, scp_status: str, list_status: str | None) -> list[PendingEvent]:
        """SCP Status Change (Event Type 4) to every subscriber, as dcm4chee-arc sends it:
        the well-known UID to global subscribers, the UPS UID to instance subscribers."""
        info = scp_status_info(scp_status, list_status)
        events: list[PendingEvent] = [
            (ae, EventType.SCP_STATUS_CHANGE, GLOBAL_SUBSCRIPTION, info)
            for ae in self.global_subscriptions
        ]
        for uid, subs in self.subscriptions.items():
            events += [(ae, EventType.SCP_STATUS_CHANGE, uid, info) for ae in subs]
        return events

    # ------------------------------------------------------------------ N-SET / N-GET
    def set(self, uid: str, mods: Dataset, note: Note) -> Outcome:
        """CC.2.6.3 with the statuses of Table CC.2.6-1."""
        ups = self.ups.get(uid)
        if ups is None:
            return Outcome(0xC307, "no such UPS")
        forbidden = [k for k in rules.NOT_SETTABLE if k in mods]
        if forbidden:
            note("PS3.4 CC.2.6.2 / Table CC.2.5-3 (N-SET)", f"{forbidden}")
            return Outcome(0x0105, f"may not be set: {', '.join(forbidden)}")
        state = str(ups.ProcedureStepState)
        given = str(mods.get("TransactionUID", "") or "")
        if state in (COMPLETED, CANCELED):
            return Outcome(0xC300, "The UPS may no longer be updated")
        if state == IN_PROGRESS and given != self.transaction_uids.get(uid):
            return Outcome(0xC301, "The correct Transaction UID was not provided")
        if state == SCHEDULED and (given or not self.allow_set_on_scheduled):
            return Outcome(0xC310, "The UPS is not in the IN PROGRESS state")
        invalid = invalid_enums(mods)
        if invalid:
            return Outcome(0x0106, f"invalid value: {', '.join(invalid)}")
        before = deepcopy(ups)
        for elem in mods:
            if elem.keyword != "TransactionUID":
                ups[elem.tag] = deepcopy(elem)
        ups.ScheduledProcedureStepModificationDateTime = now_dt()
        return Outcome(0x0000, events=self._set_events(uid, before, ups))

    def _set_events(self, uid: str, before: Dataset, after: Dataset) -> list[PendingEvent]:
        """CC.2.4.3: Progress Report, State Report (Input Readiness) and UPS Assigned."""

        def changed(keyword: str) -> bool:
            return before.get(keyword) != after.get(keyword)

        events: list[PendingEvent] = []
        if changed("ProcedureStepProgressInformationSequence"):
            info = progress_report_info(after)
            events += self._to_subscribers(EventType.PROGRESS_REPORT, uid, info)
        if changed("InputReadinessState"):
            events += self._state_reports(uid)
        if changed("ScheduledStationNameCodeSequence") or changed(
            "ScheduledHumanPerformersSequence"
        ):
            assigned = assigned_info(after)
            if assigned is not None:
                events += self._to_subscribers(EventType.ASSIGNED, uid, assigned)
        return events

    def get(self, uid: str, tags: list[int], note: Note) -> Outcome:
        """CC.2.7.3: the requested attributes (all if none), never the Transaction UID."""
        ups = self.ups.get(uid)
        if ups is None:
            return Outcome(0xC307, "no such UPS")
        transaction_tag = rules.tag_of("TransactionUID")
        if transaction_tag in tags:
            note("PS3.4 CC.2.7.2", "Transaction UID requested")
        reply = Dataset()
        for tag in tags or [e.tag for e in ups]:
            if tag == transaction_tag:
                continue
            if tag in ups:
                reply.add(deepcopy(ups[tag]))
            else:
                vr = dictionary_VR(tag)
                reply.add(DataElement(tag, vr, [] if vr == "SQ" else None))
        return Outcome(0x0000, reply=reply)

    # ------------------------------------------------------------------ C-FIND
    def find(self, query: Dataset) -> list[Dataset]:
        """CC.2.8.3.1 "Worklist" search: the response Identifiers, in creation order."""
        return [
            rules.response_identifier(query, ups, self.uids.push)
            for ups in self.ups.values()
            if rules.matches(query, ups)
        ]
