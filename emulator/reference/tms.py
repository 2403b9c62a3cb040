"""The reference TMS: a strict UPS SCP (RO-17, 19, 21, 25, 26) and RO-20 C-MOVE SCP.

Every N-ACTION and N-SET is decided by the data in ``profiles/ups.yaml`` and written
atomically by :class:`UpsStore`, so the state survives a restart and two devices racing
for one UPS cannot both win. When a delivery ends CANCELED part-way, the continuation is
scheduled from the treatment record the device stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pydicom.valuerep import MAX_VALUE_LEN, validate_value
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from emulator import ups_attributes, ups_events, ups_services
from emulator.metrics import Metrics, default_metrics
from emulator.net.ae_factory import NetworkSettings, make_ae
from emulator.net.peers import Peer, PeerDirectory, calling_allow_list
from emulator.net.served_ae import ServedAE
from emulator.net.storage_scp import status_dataset
from emulator.net.uid_registry import register_uid_set
from emulator.profile import DEFAULT_EDITION, DEFAULT_UID_SET, load_profile
from emulator.reference import request_datasets, ups_rules
from emulator.reference.event_dispatch import EventDispatcher
from emulator.reference.matching import condition, element_text, ensure_readable
from emulator.reference.qr_query import StudyRootQuery
from emulator.reference.qr_scp import QueryRetrieveSCP
from emulator.reference.scheduler import Scheduler
from emulator.reference.tms_faults import FaultInjector, TmsFaults
from emulator.reference.ups_store import (
    UPS_CODE_COLUMNS,
    UPS_COLUMNS,
    UpsRecord,
    UpsStore,
    now_dt,
)
from emulator.reference.ups_watch import UpsWatch
from emulator.store import ObjectStore

LOG = logging.getLogger("tdw.tms")
STATUS_PENDING = 0xFF00
STATUS_UNABLE_TO_PROCESS = 0xC000
STATUS_INVALID_ATTRIBUTE = 0x0106
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_RESOURCE_LIMITATION = 0x0213
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class (PS3.4 C.4.1.1.4)
ACTION_CHANGE_STATE = 1
ACTION_REQUEST_CANCEL = 2


@dataclass
class TmsConfig:
    data_dir: Path
    ae_title: str = "TMS"
    host: str = "127.0.0.1"
    port: int = 11114
    peers: list[Peer] = field(default_factory=list)
    allowed_callers: list[str] = field(default_factory=list)
    accept_any_ae: bool = False
    edition: str = DEFAULT_EDITION
    uid_set: str = DEFAULT_UID_SET
    network: NetworkSettings = field(default_factory=NetworkSettings)
    faults: TmsFaults = field(default_factory=TmsFaults)  # for testing performers
    # The largest N-CREATE, N-SET or C-FIND request body accepted, encoded (docs/tms.md).
    max_request_bytes: int = 1 << 20
    # AEs whose forced Request Cancel ends an IN PROGRESS UPS (tdw-emu tms cancel --force).
    operator_consoles: tuple[str, ...] = ("OPERATOR",)

    def calling_allow_list(self) -> list[str] | None:
        return calling_allow_list(self.peers, self.allowed_callers, self.accept_any_ae)


class TmsServer(ServedAE):
    """The TMS AE; ``archive_store`` is the co-hosted Archive, where records are read."""

    def __init__(
        self,
        config: TmsConfig,
        archive_store: ObjectStore,
        archive_ae_title: str,
        station_names: dict[str, str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.host, self.port, self.settings = config.host, config.port, config.network
        self.profile = load_profile(config.edition, config.uid_set)
        register_uid_set(self.profile.sop_classes)
        root = Path(config.data_dir)
        self.metrics_registry = metrics or default_metrics()
        self.metrics = self.metrics_registry.add_actor(config.ae_title, "tms")
        self.ups = UpsStore(root / "ups.sqlite3", on_state=self.metrics.ups_transition)
        self.metrics_registry.watch_workitems(config.ae_title, self.ups.count_by_state)
        self.store = ObjectStore(root / "objects")
        self.archive_store = archive_store
        self.peers = PeerDirectory(config.peers)
        self.qr = QueryRetrieveSCP(
            StudyRootQuery(self.store, config.ae_title), self.peers, config.network
        )
        self.scheduler = Scheduler(
            self.ups,
            archive_store,
            self.store,
            self.profile,
            config.ae_title,
            archive_ae_title,
            station_names,
        )
        # UPS Watch SCP and UPS Event SCU (PS3.4 CC.2.3, CC.2.4): subscriptions and owed
        # events in the UPS database, sent by their own thread.
        self.watch = UpsWatch(
            self.ups,
            lambda ae: self.peers.get(ae) is not None,
            on_owed=self._events_owed,
            matcher=self._ups_query,
        )
        self.events = EventDispatcher(
            self.watch,
            config.ae_title,
            self.peers.get,
            self.profile.sop_classes,
            config.network,
            on_sent=lambda event_type, ok: self.metrics.ups_event(
                ups_events.event_name(event_type), ok
            ),
            on_owed=self.metrics.set_events_owed,
        )
        self.continuations: list[str] = []
        # Told the station of every worklist query (a soak's feeder); never blocks.
        self.on_worklist_query: Callable[[str], None] | None = None
        self._faults = FaultInjector(config.faults)

    def build(self) -> tuple[AE, list]:
        uids = self.profile.sop_classes
        ae = make_ae(self.config.ae_title, self.config.network, self.config.calling_allow_list())
        ae.add_supported_context(Verification)
        classes = ["ups_push", "ups_pull", "ups_watch"]
        classes += ["ups_query"] if "ups_query" in uids.uids else []
        for name in classes:
            ae.add_supported_context(uids[name])
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        handlers = [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self.qr.on_move),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_N_SET, self._on_n_set),
            (evt.EVT_N_GET, self._on_n_get),
            (evt.EVT_N_CREATE, self._on_n_create),
        ]
        return ae, handlers

    def start(self) -> tuple[str, int]:
        """Listens, then tells every subscriber it is back (its subscriptions kept) and
        sends what it still owed them from before a stop or a crash."""
        address = super().start()
        self.watch.scp_status("RESTARTED", "WARM START")
        self.events.start()
        return address

    def stop(self) -> None:
        self._faults.release()
        try:
            if self._server is not None:  # listening: subscribers are told it goes
                self.watch.scp_status("GOING DOWN", "WARM START")
            self.events.stop()
        finally:
            super().stop()

    def _events_owed(self) -> None:
        self.events.wake()

    def close_resources(self) -> None:
        self.metrics_registry.forget_workitems(self.config.ae_title)
        self.ups.close()
        self.store.close()

    # -- C-FIND ------------------------------------------------------------------------------

    def _on_find(self, event: evt.Event):
        if event.context.abstract_syntax == StudyRootQueryRetrieveInformationModelFind:
            yield from self.qr.on_find(event)
            return
        too_big = self._oversized(event.request.Identifier, "C-FIND identifier")
        if too_big:
            yield _answer(STATUS_OUT_OF_RESOURCES, too_big), None
            return
        try:
            where, params = self._ups_query(event.identifier)
            if self.on_worklist_query is not None:
                self.on_worklist_query(_queried_station(event.identifier))
            records = self.ups.select(where, params)
        except IdentifierMismatch as exc:
            LOG.warning("UPS C-FIND refused: %s", exc)
            yield _answer(STATUS_IDENTIFIER_MISMATCH, str(exc)), None
            return
        except ValueError as exc:
            LOG.warning("UPS C-FIND refused: %s", exc)
            yield _answer(STATUS_UNABLE_TO_PROCESS, str(exc)), None
            return
        for record in records:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield STATUS_PENDING, self._response(event.identifier, record.dataset)
        yield 0x0000, None

    def _ups_query(self, identifier: Dataset) -> tuple[str, list[str]]:
        ensure_readable(identifier)  # UnreadableIdentifier is a ValueError: refused, 0xC000
        parts, params = [], []
        for element in identifier:
            keyword = element.keyword
            expected_vr = (
                "SQ" if keyword in UPS_CODE_COLUMNS else UPS_COLUMNS.get(keyword, ("", ""))[1]
            )
            if expected_vr and expected_vr != element.VR:
                raise IdentifierMismatch(f"{keyword} must be {expected_vr}, not {element.VR}")
            if keyword in UPS_COLUMNS:
                value = element_text(element)
                column, vr = UPS_COLUMNS[keyword]
                _validate(keyword, vr, value)
                if value and value != "*":
                    sql, values = condition(column, vr, value)
                    parts.append(f"({sql})")
                    params += values
            elif keyword in UPS_CODE_COLUMNS and element.value:
                item = element.value[0]
                for sub, column in zip(
                    ("CodeValue", "CodingSchemeDesignator"), UPS_CODE_COLUMNS[keyword], strict=True
                ):
                    value = str(item.get(sub, "") or "").strip()
                    _validate(sub, "SH", value)
                    if value and value != "*":
                        sql, values = condition(column, "SH", value)
                        parts.append(f"({sql})")
                        params += values
        return " AND ".join(parts), params

    def _response(self, identifier: Dataset, ups: Dataset) -> Dataset:
        """The requested keys of one UPS, never its Transaction UID (PS3.4 CC.2.5.1.1)."""
        hidden = ups_rules.never_returned()
        rsp = Dataset()
        for element in identifier:
            keyword = element.keyword
            if not keyword or keyword in hidden:
                continue
            if keyword in ups:
                stored = deepcopy(ups[keyword])
                if element.VR == "SQ" and element.value and stored.value:
                    wanted = {e.tag for e in element.value[0]}
                    if wanted:
                        for item in stored.value:
                            for tag in [e.tag for e in item if e.tag not in wanted]:
                                del item[tag]
                rsp[element.tag] = stored
            else:
                empty = deepcopy(element)
                empty.value = [] if element.VR == "SQ" else None
                rsp[element.tag] = empty
        return rsp

    # -- N-ACTION ----------------------------------------------------------------------------

    def _refused(
        self, event: evt.Event, service: str, action_type: int | None = None
    ) -> Dataset | None:
        """The refusal of a UPS request on the wrong context or naming the wrong SOP Class
        (Tables CC.2-1..5, CC.3.1); the legacy form (the context's own class) is logged."""
        request = event.request
        requested = request.RequestedSOPClassUID
        context = event.context.abstract_syntax
        refused = ups_services.refusal(
            self.profile.sop_classes, context, requested, service, action_type
        )
        if refused is not None:
            LOG.warning(
                "%s from %s refused: %s", service, event.assoc.requestor.ae_title, refused.comment
            )
            return _answer(refused.status, refused.comment)
        if not ups_services.is_standard_form(self.profile.sop_classes, requested):
            LOG.info(
                "%s from %s names %s, not UPS Push (PS3.4 CC.3.1); accepted",
                service,
                event.assoc.requestor.ae_title,
                requested,
            )
        return None

    def _on_n_action(self, event: evt.Event) -> tuple[Dataset | int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        action_type = int(event.action_type or 0)
        refused = self._refused(event, "N-ACTION", action_type)
        if refused is not None:
            return refused, None
        try:
            info = request_datasets.decode(lambda: event.action_information)
        except request_datasets.RequestDatasetError as exc:
            return _answer(exc.status, str(exc)), None
        if ups_events.watch_action(action_type):
            return self._watch_action(event, uid, action_type, info), None
        # A state change and what the TMS schedules after it are one step for the station's
        # feeder (Scheduler.station_lock).
        with self.scheduler.station_lock(self.ups.station_of(uid)):
            if action_type == ACTION_REQUEST_CANCEL:
                requester = str(event.assoc.requestor.ae_title).strip()
                return self._request_cancel(uid, info, requester)
            status, reply = self._change_state(uid, info)
        if reply is not None:  # accepted; outside the lock, so only this reply is late
            self._faults.hold_reply(str(reply.get("ProcedureStepState", "")))
        return status, reply

    def _watch_action(self, event: evt.Event, uid: str, action_type: int, info: Dataset) -> Dataset:
        """N-ACTION on UPS Watch (PS3.4 CC.2.3): subscribe, unsubscribe, suspend global."""
        action = ups_events.watch_action(action_type)
        caller = str(event.assoc.requestor.ae_title).strip()
        receiver = str(info.get("ReceivingAE", "") or caller).strip()
        lock = str(info.get("DeletionLock", "FALSE") or "FALSE").upper() == "TRUE"
        keys = Dataset()
        for element in info:
            if element.keyword not in ("ReceivingAE", "DeletionLock"):
                keys[element.tag] = element
        try:
            status = self.watch.act(action, receiver, uid, lock, keys)
        except ValueError as exc:  # Matching Keys the TMS cannot match on
            return _answer(STATUS_INVALID_ATTRIBUTE, f"Matching Keys: {exc}")
        LOG.info("UPS Watch %s %s for %s: 0x%04X", action, uid, receiver, status)
        return _answer(status)

    def _change_state(self, uid: str, info: Dataset) -> tuple[Dataset, Dataset | None]:
        requested = str(info.get("ProcedureStepState", "") or "").strip()
        sent_uid = str(info.get("TransactionUID", "") or "").strip()
        outcome: dict = {}

        def decide(current: UpsRecord | None) -> UpsRecord | None:
            if current is None:
                outcome["status"] = ups_rules.ups_rules()["change_state"]["unknown_instance"]
                return None
            after = ups_rules.with_change_state_extras(current.dataset, info, requested)
            decision = ups_rules.change_state(
                current.state, requested, sent_uid, current.transaction_uid, after
            )
            outcome.update(status=decision.status, comment=decision.comment, state=current.state)
            if decision.status != 0 or decision.to_state is None:
                return None
            if decision.to_state == "CANCELED" and self._faults.refuse_cancel():
                outcome.update(status=0xC304, comment="refused by fault injection")
                return None
            transaction_uid = current.transaction_uid
            if decision.record_uid:
                if not sent_uid and not self.profile.performer_may_send_empty_transaction_uid:
                    outcome.update(status=0xC301, comment="Transaction UID is required")
                    return None
                transaction_uid = sent_uid or str(generate_uid())
                outcome["generated_uid"] = "" if sent_uid else transaction_uid
            after.ProcedureStepState = decision.to_state
            _finalise(after, decision.to_state)
            outcome["state"] = decision.to_state
            outcome["dataset"] = after
            return UpsRecord(
                current.sop_instance_uid,
                current.session_id,
                current.step,
                decision.to_state,
                transaction_uid,
                current.cancel_requested,
                after,
            )

        updated = self.ups.transition(uid, decide)
        status = int(outcome["status"])
        LOG.info("N-ACTION %s -> %s: 0x%04X %s", uid, requested, status, outcome.get("comment", ""))
        if status & 0xF000 in (0xA000, 0xC000) or status in (0x0106, 0x0118):
            return _answer(status, outcome.get("comment", "")), None
        reply = Dataset()
        reply.ProcedureStepState = outcome.get("state", requested)
        if outcome.get("generated_uid"):
            reply.TransactionUID = outcome["generated_uid"]
        final = (updated.dataset if updated else None) or outcome.get("dataset")
        progress = final.get("ProcedureStepProgressInformationSequence") if final else None
        if progress:
            reply.ProcedureStepProgressInformationSequence = deepcopy(progress)
        if updated is not None and updated.state == "CANCELED":
            self._after_canceled(updated, performed=True)
        return _answer(status), reply

    def _request_cancel(
        self, uid: str, info: Dataset, requester: str = ""
    ) -> tuple[Dataset, Dataset | None]:
        outcome: dict = {}

        def decide(current: UpsRecord | None) -> UpsRecord | None:
            if current is None:
                outcome["status"] = ups_rules.ups_rules()["change_state"]["unknown_instance"]
                return None
            if current.state == "IN PROGRESS" and self._forced(info, requester):
                outcome["status"] = 0x0000
                return self._ended_by_operator(current, info, requester)
            decision = ups_rules.request_cancel(current.state)
            outcome["status"] = decision.status
            if decision.status != 0:
                return None
            if decision.cancel_requested and not self.watch.subscribers(uid):
                outcome["status"] = ups_rules.ups_rules()["request_cancel"]["unreachable_performer"]
                outcome["comment"] = "no AE is subscribed to this UPS: nobody can be told"
                return None
            after = deepcopy(current.dataset)
            state = current.state
            if decision.to_state:
                state = after.ProcedureStepState = decision.to_state
                reason = str(info.get("ReasonForCancellation", "") or "canceled by request")
                after.ProcedureStepProgressInformationSequence = Sequence(
                    [ups_attributes.cancellation_item(0.0, reason, "tms_request")]
                )
            return UpsRecord(
                current.sop_instance_uid,
                current.session_id,
                current.step,
                state,
                current.transaction_uid,
                decision.cancel_requested,
                after,
                context={"requesting_ae": requester, "request": info},
            )

        updated = self.ups.transition(uid, decide)
        status = int(outcome["status"])
        if updated is not None and updated.state == "CANCELED":
            self._after_canceled(updated, performed=False)
        return _answer(status, outcome.get("comment", "")), None

    def _forced(self, info: Dataset, requester: str) -> bool:
        """A Request Cancel from an operator console proposing the operator_forced code
        (profiles/ups.yaml): the operator has determined that the performer is gone."""
        forced = ups_rules.ups_rules()["request_cancel"]["operator_forced"]
        codes = info.get("ProcedureStepDiscontinuationReasonCodeSequence") or []
        proposed = {
            (str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeValue", ""))) for c in codes
        }
        return requester in self.config.operator_consoles and (
            (forced["scheme"], forced["code"]) in proposed
        )

    def _ended_by_operator(self, current: UpsRecord, info: Dataset, requester: str) -> UpsRecord:
        """PS3.4 CC.2.1.3: the SCP ends the UPS itself, CANCELED with the progress it had,
        the operator's reason and a CID 9300 code, as the Final State requires; subscribers
        (the performer, if it lives) get the State Report."""
        after = deepcopy(current.dataset)
        after.ProcedureStepState = "CANCELED"
        items = after.get("ProcedureStepProgressInformationSequence") or []
        percent = float(items[0].get("ProcedureStepProgress", 0) or 0) if items else 0.0
        reason = str(info.get("ReasonForCancellation", "") or "the performer is gone")
        cause = ups_rules.ups_rules()["request_cancel"]["operator_forced"]["cause"]
        after.ProcedureStepProgressInformationSequence = Sequence(
            [ups_attributes.cancellation_item(percent, f"ended by {requester}: {reason}", cause)]
        )
        LOG.warning(
            "UPS %s ended CANCELED by operator %s: %s", current.sop_instance_uid, requester, reason
        )
        return UpsRecord(
            current.sop_instance_uid,
            current.session_id,
            current.step,
            "CANCELED",
            current.transaction_uid,
            False,
            after,
            context={"requesting_ae": requester, "request": info},
        )

    def _after_canceled(self, canceled: UpsRecord, performed: bool) -> None:
        """What becomes of a session once one of its steps ended CANCELED (docs/tms.md).

        Its later SCHEDULED steps can no longer run in that session: they are ended too,
        with a coded reason. A delivery canceled part-way is continued from its record; a
        positioning step canceled by its performer is scheduled again as a new session; a
        step canceled by request before it started is left for the operator to reschedule.
        """
        try:
            if canceled.step == "delivery":
                session_id = self.scheduler.schedule_continuation(canceled, self._find_object)
                if session_id:
                    self.continuations.append(session_id)
                return
            self.scheduler.end_session_after(canceled, self._find_object, reschedule=performed)
        except Exception:  # what follows must never undo the accepted cancel
            LOG.exception("could not follow up the canceled UPS %s", canceled.sop_instance_uid)

    def _find_object(self, sop_instance_uid: str) -> Dataset | None:
        for store in (self.store, self.archive_store):
            instance = store.get(sop_instance_uid)
            if instance is not None:
                return store.read(instance)
        return None

    # -- N-SET / N-GET -----------------------------------------------------------------------

    def _on_n_set(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        refused = self._refused(event, "N-SET")
        if refused is not None:
            return refused, None
        too_big = self._oversized(event.request.ModificationList, "N-SET modification list")
        if too_big:
            return _answer(STATUS_RESOURCE_LIMITATION, too_big), None
        try:
            modifications = request_datasets.decode(lambda: event.modification_list)
        except request_datasets.RequestDatasetError as exc:
            LOG.warning("N-SET %s refused (0x%04X): %s", uid, exc.status, exc)
            return _answer(exc.status, str(exc)), None
        forbidden = ups_rules.n_set_forbidden(modifications)
        if forbidden:
            return _answer(
                ups_rules.ups_rules()["n_set"]["forbidden_status"],
                f"N-SET may not modify {', '.join(forbidden)}",
            ), None
        sent_uid = str(modifications.get("TransactionUID", "") or "").strip()
        outcome: dict = {}

        def decide(current: UpsRecord | None) -> UpsRecord | None:
            if current is None:
                outcome["status"] = ups_rules.ups_rules()["n_set"]["unknown_instance"]
                return None
            status = ups_rules.n_set_status(current.state, sent_uid, current.transaction_uid)
            outcome["status"] = status
            if status:
                return None
            after = deepcopy(current.dataset)
            for element in modifications:
                if element.keyword != "TransactionUID":
                    after[element.tag] = deepcopy(element)
            after.ScheduledProcedureStepModificationDateTime = now_dt()
            return UpsRecord(
                current.sop_instance_uid,
                current.session_id,
                current.step,
                current.state,
                current.transaction_uid,
                current.cancel_requested,
                after,
            )

        self.ups.transition(uid, decide)
        status = int(outcome["status"])
        LOG.info("N-SET %s: 0x%04X", uid, status)
        return _answer(status), None

    # -- N-CREATE ----------------------------------------------------------------------------

    def _on_n_create(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        """A UPS created by a scheduler or a TDW-II tool (UPS Push, PS3.4 CC.2.5), held to
        the N-CREATE column of Table CC.2.5-3 and stored as a session of its own."""
        request = event.request
        push = self.profile.sop_classes["ups_push"]
        refused = ups_services.refusal(
            self.profile.sop_classes,
            event.context.abstract_syntax,
            push if request.AffectedSOPClassUID == push else "",
            "N-CREATE",
        )
        if refused is not None:
            return _answer(refused.status, refused.comment), None
        too_big = self._oversized(request.AttributeList, "N-CREATE attribute list")
        if too_big:
            return _answer(STATUS_RESOURCE_LIMITATION, too_big), None
        uid = str(request.AffectedSOPInstanceUID or "")
        if not uid:
            return _answer(0x0120, "Affected SOP Instance UID is required"), None
        try:
            attributes = request_datasets.decode(lambda: event.attribute_list)
        except request_datasets.RequestDatasetError as exc:
            LOG.warning("N-CREATE %s refused (0x%04X): %s", uid, exc.status, exc)
            return _answer(exc.status, str(exc)), None
        problems = ups_attributes.n_create_problems(attributes)
        if problems:
            first = problems[0]
            return _answer(first.status, first.comment[:64]), None
        if self.ups.get(uid) is not None:
            return _answer(0x0111, "a UPS with this SOP Instance UID exists"), None
        ups = deepcopy(attributes)
        ups.SOPClassUID, ups.SOPInstanceUID = push, uid
        ups.ProcedureStepState = "SCHEDULED"
        self.scheduler.add_created(ups)
        LOG.info("N-CREATE %s by %s", uid, event.assoc.requestor.ae_title)
        reply = Dataset()
        reply.ProcedureStepState = "SCHEDULED"
        return _answer(0x0000), reply

    def _oversized(self, encoded, what: str) -> str:
        """A request body larger than the configured limit (its encoded length, measured
        before anything is decoded or stored), as the comment of its refusal."""
        size = encoded.getbuffer().nbytes if encoded is not None else 0
        limit = self.config.max_request_bytes
        return f"{what} of {size} bytes exceeds {limit}" if size > limit else ""

    def _on_n_get(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        refused = self._refused(event, "N-GET")
        if refused is not None:
            return refused, None
        record = self.ups.get(str(event.request.RequestedSOPInstanceUID))
        if record is None:
            return _answer(0xC307), None
        hidden = ups_rules.never_returned()
        wanted = list(event.attribute_identifiers or [])
        reply = Dataset()
        for element in record.dataset:
            if element.keyword in hidden or (wanted and element.tag not in wanted):
                continue
            reply[element.tag] = deepcopy(element)
        # An attribute every UPS holds is returned when asked for, zero length if it has
        # no value yet (CC.2.7.3; N-CREATE type 2).
        owed = ups_attributes.n_get_owed()
        for tag in wanted:
            keyword = keyword_for_tag(tag)
            if keyword in owed and tag not in reply:
                setattr(reply, keyword, [] if dictionary_VR(tag) == "SQ" else None)
        return _answer(0x0000), reply


def _answer(status: int, comment: str = "") -> Dataset:
    """A status for the response; a failure or warning without a comment of its own gets
    PS3.4's meaning of its code (profiles/ups.yaml), so no refusal is left unexplained."""
    return status_dataset(status, comment or ups_rules.meaning(status))


def _queried_station(identifier: Dataset) -> str:
    """The Scheduled Station Name code value a worklist query asks for, or ""."""
    items = identifier.get("ScheduledStationNameCodeSequence") or []
    return str(items[0].get("CodeValue", "") or "").strip() if items else ""


def _finalise(ups: Dataset, state: str) -> None:
    """What the TMS records itself when a UPS reaches COMPLETED: 100 % progress. (A
    CANCELED UPS already holds what Final State X requires, or it was refused.)"""
    if state != "COMPLETED":
        return
    items = ups.get("ProcedureStepProgressInformationSequence") or Sequence([Dataset()])
    items[0].ProcedureStepProgress = 100
    ups.ProcedureStepProgressInformationSequence = Sequence(list(items))


class IdentifierMismatch(ValueError):
    """A key whose VR is not the attribute's (e.g. a code sequence sent as LO): A900."""


# Longest value of a VR (PS3.5 Table 6.2-1) where pydicom's table has none: DT, and PN per
# component group. A wildcard value is held to the same limits as any other.
LONGEST = {**MAX_VALUE_LEN, "DT": 26, "DA": 8, "TM": 16, "PN": 64}


def _validate(keyword: str, vr: str, value: str) -> None:
    for single in value.split("\\") if vr == "UI" else [value]:
        if not single:
            continue
        if vr != "UI" and ("*" in single or "?" in single):
            parts = single.split("=") if vr == "PN" else [single]
            if any(len(part) > LONGEST.get(vr, 64) for part in parts):
                raise ValueError(f"invalid {keyword}: longer than {vr} allows")
            continue
        try:
            validate_value(vr, single, pydicom_config.RAISE)
        except ValueError as exc:
            raise ValueError(f"invalid {keyword}: {str(exc)[:40]}") from exc
