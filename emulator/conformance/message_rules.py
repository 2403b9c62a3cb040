"""Rule checks on every message the emulated devices received, read from the traffic log.

The checker replays the log in order and keeps what the devices could know at each point
(each UPS's state and Transaction UID, which session it belongs to, what was claimed), so
that a response is judged by the state table of ``profiles/ups.yaml`` and by the RO-17 to
RO-25 rules of ``profiles/rules.yaml``, never by what one scenario happened to expect.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from emulator import ups_attributes
from emulator.conformance.event_rules import check_events
from emulator.conformance.object_rules import appendix_a_findings, parents_along, wrap
from emulator.conformance.rulebook import Finding, RuleBook, attribute_label
from emulator.conformance.traffic import Message, TrafficRecorder
from emulator.performer.actors import STEP_ORDER, session_key, step_of
from emulator.profile import Profile
from emulator.reference import ups_rules
from emulator.ups_references import references_in

WARNINGS = {0x0001, 0xB304, 0xB305, 0xB306}
PENDING = {0xFF00, 0xFF01}


@dataclass
class CheckContext:
    """Who is who, the profile the TMS is judged by, and how long a reply may take (the
    exchange timeout: ``exchange_timeout_s`` of ``profiles/rules.yaml``, or the suite's
    ``--dimse-timeout``)."""

    profile: Profile
    book: RuleBook
    tms_ae: str
    archive_ae: str
    exchange_timeout_s: float | None = None
    # Stations that are afterloaders: their delivery UPS carry a brachytherapy plan's
    # inputs (profiles/rules.yaml ro17_inputs: delivery_brachy), not a linac's.
    afterloader_stations: frozenset[str] = frozenset()

    @property
    def reply_within_s(self) -> float:
        if self.exchange_timeout_s is not None:
            return float(self.exchange_timeout_s)
        return float(self.book.tables().get("exchange_timeout_s", 30))


@dataclass
class _Ups:
    state: str = ""
    transaction_uid: str = ""
    dataset: Dataset = field(default_factory=Dataset)
    session: tuple[str, str] = ("", "")
    step: str | None = None
    # A request on this UPS got no reply, or an answer PS3.4 does not define: what the TMS
    # made of it is unknown, so the next answers are judged as answers to a retry.
    uncertain: bool = False

    def knows(self, path: str) -> bool:
        """Whether the traffic can show that ``path`` is missing from the UPS: attributes the
        performer owes in a final state (P, X) always, others only once they crossed the
        wire (the TMS may hold an R attribute that no response carried)."""
        keyword = path.split(">", 1)[0]
        return keyword in self.dataset or ups_attributes.final_code(keyword) in ("P", "X")


def delivery_type_parameter(ups: Dataset, profile: Profile) -> Dataset | None:
    """The Scheduled Processing Parameter item coded as the edition's Treatment Delivery Type."""
    concept = profile.concept("treatment_delivery_type")
    for item in ups.get("ScheduledProcessingParametersSequence") or []:
        names = item.get("ConceptNameCodeSequence") or []
        if (
            names
            and str(names[0].get("CodeValue", "")) == concept.value
            and str(names[0].get("CodingSchemeDesignator", "")) == concept.scheme
        ):
            return item
    return None


def _request_text(request: Message) -> str:
    """A request as a finding names it: N-ACTION IN PROGRESS on UPS 1.2.3, C-FIND, ..."""
    what = request.name[:-3]
    info = request.dataset
    if request.name == "N-ACTION-RQ" and info is not None and "ProcedureStepState" in info:
        what += f" {info.ProcedureStepState}"
    elif request.name == "N-ACTION-RQ":
        what += f" type {request.action_type}"
    if request.sop_instance_uid and request.name != "C-STORE-RQ":
        what += f" on {request.sop_instance_uid}"
    return what


def _where(message: Message) -> str:
    label = f" during {message.label}" if message.label else ""
    return f"association {message.association}, {message.name} #{message.seq}{label}"


def _status_ok(status: int, service: str, tables: dict) -> bool:
    statuses = tables["ups_statuses"]
    if status in statuses["general"] or status in statuses.get(service, []):
        return True
    ranges = statuses.get(f"{service}-ranges", [])
    return any(low <= status <= high for low, high in ranges)


class TrafficChecker:
    """Applies the message rules to a recorded run; ``check`` returns the findings."""

    def __init__(self, context: CheckContext, peers: dict[int, str] | None = None) -> None:
        self.ctx = context
        self.book = context.book
        self.tables = context.book.tables()
        self.uids = context.profile.sop_classes
        self.ups: dict[str, _Ups] = defaultdict(_Ups)
        self.counted: set[str] = set()
        self.won: dict[str, list[float]] = {}
        self.peers = peers or {}  # association number -> the peer's AE title
        self.session_inputs: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.findings: list[Finding] = []

    def _add(self, rule: str, message: str, attribute: str, where: Message) -> None:
        if rule in self.book:
            self.findings.append(
                self.book.finding(rule, message, attribute, _where(where), seq=where.seq)
            )

    # -- entry point ---------------------------------------------------------------------------

    def check(
        self, recorder: TrafficRecorder, messages: list[Message] | None = None
    ) -> list[Finding]:
        messages = recorder.since(0) if messages is None else messages
        ups_classes = {self.uids[c] for c in ("ups_push", "ups_pull", "ups_watch")}
        stored: dict[str, Message] = {}
        # Successful claims, by UPS: when claims overlap in time, the loser's C302 may be
        # recorded before the winner's 0000, so the table is applied knowing all of them.
        for request, response in recorder.exchanges(messages):
            info = request.dataset
            if (
                request.name == "N-ACTION-RQ"
                and response.status == 0
                and info is not None
                and str(info.get("ProcedureStepState", "")) == "IN PROGRESS"
            ):
                self.won.setdefault(request.sop_instance_uid, []).append(request.time)
        pending: dict[tuple[int, int], list[Message]] = defaultdict(list)
        for message in messages:
            if message.is_pending:
                pending[(message.association, message.responding_to or 0)].append(message)
        for message in messages:
            if message.direction == "received" and message.name == "C-STORE-RQ":
                stored.setdefault(message.sop_instance_uid, message)
        for request, response in recorder.requests(messages):
            if request.direction != "sent":
                continue
            service = request.name[:-3]
            ups = request.sop_class_uid in ups_classes
            if not self._replied(request, response, ups, recorder):
                continue
            self._push_class(request, response)
            if service == "C-FIND" and ups:
                found = pending.get((request.association, request.message_id or 0), [])
                for match in found:
                    if match.dataset is not None:
                        self._identifier(request, match)
                self._worklist(request, response, [m.dataset for m in found if m.dataset])
            elif service == "N-ACTION":
                self._n_action(request, response)
            elif service == "N-SET":
                self._n_set(request, response)
            elif service == "N-GET" and ups:
                self._n_get(request, response)
            elif service == "C-MOVE":
                self._move(request, response, stored)
            if ups and not _status_ok(response.status, service, self.tables):
                self._add(
                    "CC/Status-code",
                    f"{service} answered with 0x{response.status:04X}, which PS3.4 Annex CC "
                    f"does not define for {service}",
                    "Status (0000,0900)",
                    response,
                )
                self._unsure(request)
        self._appendix_a(messages)
        return self.findings

    # -- every request -------------------------------------------------------------------------

    def _replied(
        self, request: Message, response: Message | None, ups: bool, recorder: TrafficRecorder
    ) -> bool:
        """Whether ``request`` was answered in time; a missing or late reply is a finding
        (DIMSE/Reply), and a UPS it left unknown is judged as retried from then on. A request
        whose association this side aborted before the timeout (a step that cuts a request
        off on purpose) was never waited for."""
        limit = self.ctx.reply_within_s
        what = _request_text(request)
        if response is None or response.status is None:
            assoc = recorder.associations.get(request.association)
            cut_off = (
                assoc is not None
                and assoc.aborted_here
                and assoc.closed is not None
                and assoc.closed - request.time < limit
            )
            if cut_off:
                if ups:
                    self._unsure(request)
                return False
            self._add(
                "DIMSE/Reply",
                f"no reply to {what} within the {limit:g} s exchange timeout",
                "Status (0000,0900)",
                request,
            )
            if ups:
                self._unsure(request)
            return False
        took = response.time - request.time
        if took > limit:
            self._add(
                "DIMSE/Reply",
                f"{what} answered after {took:.1f} s, beyond the {limit:g} s exchange timeout",
                "Status (0000,0900)",
                response,
            )
        return True

    def _unsure(self, request: Message) -> None:
        if request.name in ("N-ACTION-RQ", "N-SET-RQ"):
            self.ups[request.sop_instance_uid].uncertain = True

    def _push_class(self, request: Message, response: Message) -> None:
        """CC.3.1: a request naming UPS Push (as every UPS request must) is not refused for
        its SOP Class."""
        refused_for_class = (0x0118, 0x0119, 0x0122)
        if request.sop_class_uid == self.uids["ups_push"] and response.status in refused_for_class:
            context = self.uids.name_of(request.context_uid) or request.context_uid
            self._add(
                "CC/UPS-Push-class",
                f"{_request_text(request)} names UPS Push (on the {context} context) and was "
                f"refused with 0x{response.status:04X}",
                "RequestedSOPClassUID (0000,0003)",
                response,
            )

    # -- RO-17 ---------------------------------------------------------------------------------

    def _is_worklist(self, request: Message) -> bool:
        ds = request.dataset
        return ds is not None and str(ds.get("ProcedureStepState", "")) == "SCHEDULED"

    def _identifier(self, request: Message, response: Message) -> None:
        """Rules on one pending identifier of a UPS C-FIND."""
        ident, asked = response.dataset, request.dataset or Dataset()
        uid = str(ident.get("SOPInstanceUID", ""))
        record = self.ups[uid]
        record.session = session_key(ident)
        record.step = step_of(ident)
        if not record.state and ident.get("ProcedureStepState"):
            record.state = str(ident.ProcedureStepState)
        for element in ident:
            if element.keyword not in record.dataset:
                record.dataset[element.tag] = deepcopy(element)
        label = f"UPS {uid} ({ident.get('ProcedureStepLabel', '')})"
        if str(ident.get("TransactionUID", "") or ""):
            self._add(
                "RO-17/Transaction-UID-hidden",
                f"{label} returned its Transaction UID",
                attribute_label("TransactionUID"),
                response,
            )
        if "SOPClassUID" in asked and str(ident.get("SOPClassUID", "")) != self.uids["ups_push"]:
            self._add(
                "RO-17/SOP-Class",
                f"{label} has SOP Class UID {ident.get('SOPClassUID', '')!r}, not UPS Push "
                f"{self.uids['ups_push']}",
                attribute_label("SOPClassUID"),
                response,
            )
        if not self._is_worklist(request):
            return
        if str(ident.get("ProcedureStepState", "")) != "SCHEDULED":
            self._add(
                "RO-17/Note-1",
                f"{label} returned in state {ident.get('ProcedureStepState', '')!r} to a "
                "query for SCHEDULED",
                attribute_label("ProcedureStepState"),
                response,
            )
        self._return_keys(ident, asked, label, response)
        self._workitem(ident, label, response)
        step = record.step
        if step in self.tables["ro17_steps_with_outputs"] and not str(
            ident.get("StudyInstanceUID", "")
        ):
            self._add(
                "RO-17/Note-9",
                f"{label} ({step}) has no Study Instance UID for its results",
                attribute_label("StudyInstanceUID"),
                response,
            )
        if step == "delivery":
            self._delivery_type(ident, label, response)
        self._inputs(ident, step, label, response)

    def _return_keys(self, ident: Dataset, asked: Dataset, label: str, where: Message) -> None:
        for key in self.tables["ro17_return_keys"]:
            parts = key["path"].split(">")
            if parts[0] not in asked:
                continue
            rule = key.get("rule", "RO-17/Table-3.17-1")
            for _, holder in parents_along(ident, parts):
                keyword = parts[-1]
                need = key["need"]
                value = holder[keyword].value if keyword in holder else None
                if keyword not in holder:
                    problem = "not returned"
                elif need == "value" and value in (None, "", []):
                    problem = "returned empty"
                elif need == "items" and not value:
                    problem = "returned without items"
                else:
                    continue
                self._add(
                    rule,
                    f"{label}: {key['path']} {problem}",
                    attribute_label(key["path"]),
                    where,
                )

    def _workitem(self, ident: Dataset, label: str, where: Message) -> None:
        items = ident.get("ScheduledWorkitemCodeSequence") or []
        code = items[0] if items else Dataset()
        if step_of(ident) is None:
            self._add(
                "RO-17/Workitem-code",
                f"{label}: Scheduled Workitem Code {code.get('CodeValue', '')!r} "
                f"({code.get('CodingSchemeDesignator', '')!r}) is in none of the RO-17 ranges",
                attribute_label("ScheduledWorkitemCodeSequence>CodeValue"),
                where,
            )

    def _delivery_type(self, ident: Dataset, label: str, where: Message) -> None:
        concept = self.ctx.profile.concept("treatment_delivery_type")
        item = delivery_type_parameter(ident, self.ctx.profile)
        if item is None:
            self._add(
                "RO-17/Table-3.17-2",
                f"{label}: no Treatment Delivery Type parameter "
                f"({concept.value}, {concept.scheme})",
                attribute_label("ScheduledProcessingParametersSequence"),
                where,
            )
            return
        name = item.ConceptNameCodeSequence[0]
        problems = []
        if str(item.get("ValueType", "")) != "TEXT":
            problems.append(f"Value Type {item.get('ValueType', '')!r}, not TEXT")
        if str(name.get("CodeMeaning", "")) != concept.meaning:
            problems.append(f"Code Meaning {name.get('CodeMeaning', '')!r}")
        if str(item.get("TextValue", "")) not in ("TREATMENT", "CONTINUATION"):
            problems.append(f"Text Value {item.get('TextValue', '')!r}")
        for problem in problems:
            self._add(
                "RO-17/Table-3.17-2",
                f"{label}: Treatment Delivery Type parameter has {problem}",
                attribute_label("ScheduledProcessingParametersSequence"),
                where,
            )

    def _inputs(self, ident: Dataset, step: str | None, label: str, where: Message) -> None:
        refs = references_in(ident.get("InputInformationSequence") or [])
        self.session_inputs[session_key(ident)].update(r.sop_instance_uid for r in refs)
        stations = ident.get("ScheduledStationNameCodeSequence") or []
        station = str(stations[0].get("CodeValue", "")) if stations else ""
        if step == "delivery" and station in self.ctx.afterloader_stations:
            step = "delivery_brachy"
        table = self.tables["ro17_inputs"].get(step or "")
        if not table:
            return
        if "by_code" in table:
            items = ident.get("ScheduledWorkitemCodeSequence") or []
            code = str(items[0].get("CodeValue", "")) if items else ""
            spec = table["by_code"].get(code)
        else:
            spec = table["classes"]
        if spec is None:
            return
        attribute = attribute_label("InputInformationSequence")
        at = {"archive": self.ctx.archive_ae, "tms": self.ctx.tms_ae}
        by_class: dict[str, list] = defaultdict(list)
        for ref in refs:
            by_class[self.uids.name_of(ref.sop_class_uid) or ref.sop_class_uid].append(ref)
        for name, found in by_class.items():
            if name not in spec:
                self._add(
                    "RO-17/Note-8",
                    f"{label}: {len(found)} input(s) of class {name} that a {step} step "
                    "does not need",
                    attribute,
                    where,
                )
        for name, need in spec.items():
            found = by_class.get(name, [])
            low = need.get("count", need.get("min", 0))
            high = need.get("count", 10**9)
            if not low <= len(found) <= high:
                wanted = need.get("count", f"at least {low}")
                self._add(
                    "RO-17/Note-8",
                    f"{label}: {len(found)} {name} input(s), needs {wanted}",
                    attribute,
                    where,
                )
            place = need.get("at", "any")
            for ref in found:
                if place != "any" and ref.retrieve_ae_title != at[place]:
                    self._add(
                        "RO-17/Note-8",
                        f"{label}: {name} {ref.sop_instance_uid} is at "
                        f"{ref.retrieve_ae_title!r}, must be at the {place} ({at[place]})",
                        attribute_label("InputInformationSequence>RetrieveAETitle"),
                        where,
                    )
            if need.get("one_series") and len({r.series_instance_uid for r in found}) > 1:
                self._add(
                    "RO-17/Note-8",
                    f"{label}: {name} inputs span several series, one series is expected",
                    attribute,
                    where,
                )

    def _worklist(self, request: Message, final: Message, identifiers: list[Dataset]) -> None:
        """Exactly four UPS per session, one per step (3.17.4.2).

        Only UPS this run has not seen before are counted: a session part of which a device
        already claimed is rightly returned with fewer, and a continuation is four new ones.
        A session returned without its first steps but with all the later ones is one whose
        earlier steps were performed before (by a PPS, or an earlier run): the query asks
        for SCHEDULED UPS only. A missing later or middle step is never so; and a fresh
        session's four are judged by the scenarios' own counts (profiles/scenarios.yaml).
        """
        if not self._is_worklist(request):
            return
        sessions: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
        for ident in identifiers:
            uid = str(ident.get("SOPInstanceUID", ""))
            if uid not in self.counted:
                self.counted.add(uid)
                sessions[session_key(ident)].append(ident)
        for (patient, day), members in sessions.items():
            steps = [step_of(u) for u in members]
            missing = [s for s in STEP_ORDER if s not in steps]
            repeated = sorted({s or "unknown" for s in steps if steps.count(s) > 1})
            if not missing and not repeated:
                continue
            returned = [STEP_ORDER.index(s) for s in steps if s in STEP_ORDER]
            if (
                not repeated
                and returned
                and all(STEP_ORDER.index(m) < min(returned) for m in missing)
            ):
                continue  # the earlier steps were performed: the rest of a session
            detail = []
            if missing:
                detail.append("no " + ", ".join(missing))
            if repeated:
                detail.append("more than one " + ", ".join(repeated))
            self._add(
                "RO-17/Response-count",
                f"session of patient {patient!r} on {day}: {len(members)} UPS returned "
                f"({'; '.join(detail)}), four are required",
                attribute_label("ScheduledWorkitemCodeSequence"),
                final,
            )

    # -- N-ACTION / N-SET ---------------------------------------------------------------------

    def _expect(self, response: Message, expected: int, what: str) -> None:
        actual = response.status
        if actual is None or actual == expected:
            return
        if expected == 0 and actual in WARNINGS:
            return
        self._add(
            "CC/State-table",
            f"{what}: answered 0x{actual:04X}, the state table requires 0x{expected:04X}",
            "Status (0000,0900)",
            response,
        )

    def _n_action(self, request: Message, response: Message) -> None:
        if request.action_type != 1 or request.dataset is None:
            return
        uid = request.sop_instance_uid
        info = request.dataset
        state = str(info.get("ProcedureStepState", ""))
        sent = str(info.get("TransactionUID", "") or "")
        record = self.ups.get(uid)
        reply = response.dataset or Dataset()
        what = f"N-ACTION {state} on UPS {uid}"
        if record is not None and record.state and not record.uncertain:
            after = ups_rules.with_change_state_extras(record.dataset, info, state)
            decision = ups_rules.change_state(
                record.state, state, sent, record.transaction_uid, after, record.knows
            )
            raced = (
                state == "IN PROGRESS"
                and response.status == 0xC302
                and any(t < response.time for t in self.won.get(uid, []))
            )
            if not raced:
                self._expect(response, decision.status, f"{what} (UPS was {record.state})")
        elif record is not None and record.uncertain:
            # After a lost reply: the state table's "already there" answers (C302 to a claim
            # retried, B304/B306 to a final state retried) tell the first attempt landed.
            landed = {"IN PROGRESS": 0xC302, "COMPLETED": 0xB306, "CANCELED": 0xB304}
            if response.status == landed.get(state):
                record.state, record.uncertain = state, False
                record.transaction_uid = record.transaction_uid or sent
                return
        if response.status != 0x0000:
            return
        if record is not None:
            record.uncertain = False
        if state == "IN PROGRESS":
            given = str(reply.get("TransactionUID", "") or "")
            if not sent and not given:
                self._add(
                    "RO-19/Transaction-UID",
                    f"{what}: claimed with a zero-length Transaction UID, but the reply "
                    "carries none",
                    attribute_label("TransactionUID"),
                    response,
                )
            if str(reply.get("ProcedureStepState", "")) != "IN PROGRESS":
                self._add(
                    "RO-19/Reply-state",
                    f"{what}: the reply echoes state {reply.get('ProcedureStepState', '')!r}",
                    attribute_label("ProcedureStepState"),
                    response,
                )
            if record is not None:
                record.transaction_uid = sent or given
        elif state in ("COMPLETED", "CANCELED"):
            rule = "RO-25/Completed-reply" if state == "COMPLETED" else "RO-25/Canceled-reply"
            echoed = str(reply.get("ProcedureStepState", ""))
            items = reply.get("ProcedureStepProgressInformationSequence") or []
            progress = items[0].get("ProcedureStepProgress") if items else None
            if echoed != state:
                self._add(
                    rule,
                    f"{what}: the reply echoes state {echoed!r}",
                    attribute_label("ProcedureStepState"),
                    response,
                )
            ok = progress is not None and (
                float(progress) == 100.0 if state == "COMPLETED" else 0 <= float(progress) <= 100
            )
            if not ok:
                self._add(
                    rule,
                    f"{what}: the reply gives Procedure Step Progress {progress!r}",
                    attribute_label(
                        "ProcedureStepProgressInformationSequence>ProcedureStepProgress"
                    ),
                    response,
                )
        if record is not None:
            record.state = state

    def _n_set(self, request: Message, response: Message) -> None:
        uid = request.sop_instance_uid
        record = self.ups.get(uid)
        modifications = request.dataset or Dataset()
        sent = str(modifications.get("TransactionUID", "") or "")
        if record is not None and record.state and not record.uncertain:
            expected = ups_rules.n_set_status(record.state, sent, record.transaction_uid)
            if expected == 0 and ups_rules.n_set_forbidden(modifications):
                expected = ups_rules.ups_rules()["n_set"]["forbidden_status"]
            self._expect(response, expected, f"N-SET on UPS {uid} ({record.state})")
        if record is not None and response.status in (0x0000, *WARNINGS):
            for element in modifications:
                record.dataset[element.tag] = deepcopy(element)

    # -- C-MOVE ---------------------------------------------------------------------------------

    def _move(self, request: Message, response: Message, stored: dict[str, Message]) -> None:
        peer = self._peer_of(request)
        rule = "RO-20/Move-status" if peer == self.ctx.tms_ae else "RO-18/Move-status"
        status = response.status
        counts = {
            k: int(response.command.get(f"Number{k}Suboperations", 0) or 0)
            for k in ("Completed", "Failed", "Warning")
        }
        tables = self.tables["move_statuses"]
        allowed = status in tables["final"] or any(
            low <= (status or 0) <= high for low, high in tables["ranges"]
        )
        if not allowed:
            self._add(
                rule,
                f"C-MOVE to {peer} ended with 0x{status:04X}, not a status of PS3.4 Table C.4-2",
                "Status (0000,0900)",
                response,
            )
        elif status == 0x0000 and (counts["Failed"] or counts["Warning"]):
            self._add(
                rule,
                f"C-MOVE to {peer} reported success 0x0000 with {counts['Failed']} failed and "
                f"{counts['Warning']} warning sub-operations (B000 is required)",
                "Status (0000,0900)",
                response,
            )
        elif status == 0xB000 and not (counts["Failed"] or counts["Warning"]):
            self._add(
                rule,
                f"C-MOVE to {peer} reported 0xB000 (failures or warnings) although all "
                f"{counts['Completed']} sub-operations completed without either",
                "Status (0000,0900)",
                response,
            )
        wanted = (request.dataset or Dataset()).get("SOPInstanceUID", [])
        wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
        missing = [u for u in wanted if u not in stored or stored[u].time > response.time]
        if missing:
            self._add(
                "RO-17/Note-8-retrievable",
                f"{len(missing)} of {len(wanted)} input(s) did not arrive from {peer} "
                f"(C-MOVE 0x{status:04X}, {counts['Completed']} completed): "
                + ", ".join(missing[:3]),
                attribute_label("InputInformationSequence>ReferencedSOPInstanceUID"),
                response,
            )

    def _peer_of(self, message: Message) -> str:
        return self.peers.get(message.association, "")

    # -- Appendix A on what arrived -------------------------------------------------------------

    def _n_get(self, request: Message, response: Message) -> None:
        """PS3.4 CC.2.7.3: the selected attributes come back; the Transaction UID never."""
        if response.status is None or (response.status & 0xF000) not in (0x0000, 0xB000):
            return
        returned = response.dataset if response.dataset is not None else Dataset()
        if "TransactionUID" in returned:
            self._add(
                "CC/N-GET-response",
                "the N-GET response returned the Transaction UID",
                attribute_label("TransactionUID"),
                response,
            )
        asked = request.command.get("AttributeIdentifierList", "").split()
        owed = ups_attributes.n_get_owed()
        for tag in asked:
            keyword = keyword_for_tag(int(tag, 16)) or ""
            if keyword not in owed or int(tag, 16) in returned:
                continue
            self._add(
                "CC/N-GET-response",
                f"the N-GET asked for {keyword} and the response does not hold it",
                attribute_label(keyword),
                response,
            )

    def _appendix_a(self, messages: list[Message]) -> None:
        received = [
            m.dataset
            for m in messages
            if m.direction == "received" and m.name == "C-STORE-RQ" and m.dataset is not None
        ]
        if not received:
            return
        objects = wrap(received, self.uids, "retrieved")
        links = [sorted(uids) for uids in self.session_inputs.values()]
        self.findings.extend(appendix_a_findings(objects, self.book, links))


def check_traffic(
    recorder: TrafficRecorder, context: CheckContext, messages: list[Message] | None = None
) -> list[Finding]:
    """Every message rule over the recorded messages (all of them by default)."""
    peers = {n: a.peer_ae for n, a in recorder.associations.items()}
    findings = TrafficChecker(context, peers).check(recorder, messages)
    chosen = recorder.since(0) if messages is None else messages
    push = context.profile.sop_classes["ups_push"]
    return findings + check_events(recorder, chosen, context.book, push)
