"""Which rules a scenario gave something to judge: a rule with nothing to judge is skipped.

A rule that saw no claim cannot say a TMS answers claims rightly; reporting it as passed
would let a vendor believe a clause was tested. Each rule names in ``profiles/rules.yaml``
(``exercised_by``) the kinds of exchange it judges; this module lists the kinds a
scenario's recorded traffic holds. ``step`` rules are exercised by the scenario step that
cites them.
"""

from __future__ import annotations

from collections.abc import Iterable

from emulator import ups_events
from emulator.conformance.message_rules import PENDING
from emulator.conformance.rulebook import RuleBook
from emulator.conformance.traffic import Message, TrafficRecorder
from emulator.net.ups_scu import ACTION_CHANGE_STATE
from emulator.performer.actors import step_of
from emulator.profile import Profile


def _ok(status: int | None) -> bool:
    return status is not None and (status == 0 or (status & 0xF000) == 0xB000)


def traffic_kinds(
    recorder: TrafficRecorder,
    messages: list[Message],
    profile: Profile,
    peers: tuple[str, str],
) -> set[str]:
    """The kinds of exchange in ``messages`` (the vocabulary of ``exercised_by``).

    ``peers`` is (TMS AE title, Archive AE title): a C-MOVE is told apart by whom it went to.
    """
    tms_ae, archive_ae = peers
    uids = profile.sop_classes
    ups_classes = {uids["ups_push"], uids["ups_pull"]}
    kinds: set[str] = set()
    steps: dict[str, str] = {}
    subscribed = False
    for request, response in recorder.exchanges(messages):
        if request.direction == "received":
            if request.name == "N-EVENT-REPORT-RQ":
                kinds.add("event")
            continue
        if request.name == "N-ACTION-RQ" and ups_events.watch_action(request.action_type or 0):
            subscribed = subscribed or (
                _ok(response.status) and request.action_type == ups_events.SUBSCRIBE
            )
            continue
        if request.name == "N-ACTION-RQ" and subscribed and _ok(response.status):
            changed = request.action_type == ACTION_CHANGE_STATE
            kinds.add("watched-change" if changed else "watched-cancel-request")
        service = request.name[:-3]
        ups = request.sop_class_uid in ups_classes
        if ups:
            kinds.add("ups-exchange")
        if service == "C-FIND" and ups and response.status in PENDING:
            kinds.add("ups-find-match")
            asked = request.dataset
            if asked is not None and str(asked.get("ProcedureStepState", "")) == "SCHEDULED":
                kinds.add("worklist-match")
            if response.dataset is not None:
                steps[str(response.dataset.get("SOPInstanceUID", ""))] = (
                    step_of(response.dataset) or ""
                )
        elif service == "N-ACTION" and ups:
            kinds.add("n-action")
            info = request.dataset
            if request.action_type != ACTION_CHANGE_STATE or info is None:
                continue
            state = str(info.get("ProcedureStepState", ""))
            if state == "IN PROGRESS":
                kinds.add("claim")
                if not str(info.get("TransactionUID", "") or ""):
                    kinds.add("claim-empty-uid")
            elif state == "COMPLETED" and _ok(response.status):
                kinds.add("completed")
            elif state == "CANCELED" and _ok(response.status):
                kinds.add("canceled")
                if steps.get(request.sop_instance_uid) == "delivery":
                    kinds.add("canceled-delivery")
        elif service == "N-SET" and ups:
            kinds.add("n-set")
        elif service == "N-GET" and ups:
            kinds.add("n-get")
        elif service == "C-MOVE" and response.status not in PENDING:
            kinds.add("move")
            peer = recorder.associations.get(request.association)
            peer_ae = peer.peer_ae if peer else ""
            if peer_ae == tms_ae:
                kinds.add("move-tms")
            elif peer_ae == archive_ae:
                kinds.add("move-archive")
    for message in messages:
        if message.direction == "received" and message.name == "C-STORE-RQ":
            kinds.add("retrieved")
            name = uids.name_of(message.sop_class_uid)
            if name:
                kinds.add(f"retrieved:{name}")
    ends = {
        recorder.associations[n].ended_by
        for n in {m.association for m in messages}
        if n in recorder.associations
    }
    if "abort" in ends:
        kinds.add("abort")
    return kinds


def exercised_rules(book: RuleBook, kinds: set[str], step_rules: Iterable[str]) -> set[str]:
    """Ids of the rules the traffic (``kinds``) or a step (``step_rules``) exercised."""
    cited = set(step_rules)
    exercised = set()
    for rule_id, rule in book.rules.items():
        wanted = set(rule.exercised_by)
        if not wanted or wanted & kinds or rule_id in cited:
            exercised.add(rule_id)
    return exercised
