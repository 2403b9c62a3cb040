"""Rules on a TMS's UPS events (PS3.4 CC.2.3, CC.2.4), applied to the recorded traffic.

What the suite subscribed to (a successful UPS Watch N-ACTION 3, told by its Action Type:
the Requested SOP Class is UPS Push, CC.3.1) is watched from then on. Each event received
is held to Table CC.2.4-1 (``profiles/ups_events.yaml``) and must name UPS Push as its
Affected SOP Class (CC.2.4.3); each state change and each accepted Request Cancel of a
watched UPS must be followed by its event within the time limit of ``profiles/rules.yaml``
(``event_timeliness_s``), counted from the request: a TMS that sends the event at once and
answers late is slow to answer, not to report.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator import ups_events
from emulator.conformance.rulebook import Finding, RuleBook, attribute_label
from emulator.conformance.traffic import Message, TrafficRecorder
from emulator.net.ups_scu import ACTION_CHANGE_STATE, ACTION_REQUEST_CANCEL


@dataclass(frozen=True)
class Received:
    event_type: int
    uid: str
    state: str
    time: float


def received_events(messages: list[Message]) -> list[Received]:
    found = []
    for m in messages:
        if m.direction == "received" and m.name == "N-EVENT-REPORT-RQ":
            info = m.dataset
            state = str(info.get("ProcedureStepState", "")) if info is not None else ""
            found.append(
                Received(int(m.command.get("EventTypeID", 0)), m.sop_instance_uid, state, m.time)
            )
    return found


class EventChecker:
    def __init__(self, book: RuleBook, push_uid: str, global_uids: tuple[str, ...]) -> None:
        self.book = book
        self.push_uid = push_uid
        self.global_uids = global_uids
        self.limit_s = float(book.tables().get("event_timeliness_s", 5))
        self.findings: list[Finding] = []

    def _add(self, rule: str, message: str, attribute: str, where: Message) -> None:
        if rule in self.book:
            label = f" during {where.label}" if where.label else ""
            place = f"association {where.association}, {where.name} #{where.seq}{label}"
            self.findings.append(self.book.finding(rule, message, attribute, place, where.seq))

    def check(self, recorder: TrafficRecorder, messages: list[Message]) -> list[Finding]:
        for m in messages:
            if m.direction == "received" and m.name == "N-EVENT-REPORT-RQ":
                event_type = int(m.command.get("EventTypeID", 0))
                for problem in ups_events.problems(event_type, m.dataset):
                    keyword = problem.split(" ", 1)[0].split(">")[0]
                    self._add("CC/Event-attributes", problem, attribute_label(keyword), m)
                if m.sop_class_uid != self.push_uid:
                    self._add(
                        "CC/UPS-Push-class",
                        f"{ups_events.event_name(event_type)} names Affected SOP Class "
                        f"{m.sop_class_uid}, not UPS Push {self.push_uid}",
                        "AffectedSOPClassUID (0000,0002)",
                        m,
                    )
        events = received_events(messages)
        watched: dict[str, float] = {}  # UPS (or a global instance) -> subscribed at
        in_progress: set[str] = set()
        for request, response in recorder.requests(messages):
            if request.direction != "sent" or request.name != "N-ACTION-RQ" or response is None:
                continue  # no answer: whether it landed is unknown (message_rules says so)
            ok = response.status == 0x0000
            uid = request.sop_instance_uid
            if ups_events.watch_action(request.action_type or 0):
                if ok and request.action_type == ups_events.SUBSCRIBE:
                    watched.setdefault(uid, request.time)
                elif ok and request.action_type == ups_events.UNSUBSCRIBE:
                    watched.pop(uid, None)
                continue
            is_watched = uid in watched or any(g in watched for g in self.global_uids)
            info = request.dataset
            if request.action_type == ACTION_CHANGE_STATE and ok and info is not None:
                state = str(info.get("ProcedureStepState", ""))
                if state == "IN PROGRESS":
                    in_progress.add(uid)
                else:
                    in_progress.discard(uid)
                if is_watched:
                    self._expect(events, ups_events.STATE_REPORT, uid, state, request, response)
            elif (
                request.action_type == ACTION_REQUEST_CANCEL
                and ok
                and is_watched
                and uid in in_progress
            ):
                self._expect(events, ups_events.CANCEL_REQUESTED, uid, "", request, response)
        return self.findings

    def _expect(
        self,
        events: list[Received],
        event_type: int,
        uid: str,
        state: str,
        request: Message,
        response: Message,
    ) -> None:
        """An event of ``event_type`` for ``uid`` (reporting ``state``) within the limit of
        the request (a late reply is its own finding, not a late event)."""
        arrived = any(
            e.event_type == event_type
            and e.uid == uid
            and (not state or e.state == state)
            and request.time <= e.time <= request.time + self.limit_s
            for e in events
        )
        if arrived:
            return
        name = ups_events.event_name(event_type)
        rule = (
            "CC/Event-state-report"
            if event_type == ups_events.STATE_REPORT
            else "CC/Event-cancel-requested"
        )
        what = f"{name}" + (f" ({state})" if state else "")
        self._add(
            rule,
            f"no {what} for {uid} within {self.limit_s:g} s of the N-ACTION it accepted",
            "EventTypeID (0000,1002)",
            response,
        )


def check_events(
    recorder: TrafficRecorder, messages: list[Message], book: RuleBook, push_uid: str
) -> list[Finding]:
    return EventChecker(book, push_uid, ups_events.global_instances()).check(recorder, messages)
