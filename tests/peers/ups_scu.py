"""A UPS SCU, as a TMS client or a treatment delivery device would use it (PS3.4 Annex CC).

Conventions (read in public implementations, not copied):

* Presentation contexts: the SCU proposes UPS Push, UPS Pull and UPS Watch (and Verification).
  Each operation goes on the context of the SOP Class whose service group holds it
  (Tables CC.2-1 .. CC.2-3), as dcm4che's ``upsscu`` does (``Operation.negotiatingSOPClassUID``):
  N-CREATE and Request Cancel on Push, C-FIND / N-SET / Change State on Pull, (un)subscribe
  on Watch, N-GET on Push by default.
* Requested SOP Class UID: always UPS Push for N-ACTION, N-SET and N-GET, whatever the
  context (CC.2.1.2, CC.2.2.2, CC.2.3.2, CC.2.6.2, CC.2.7.2 and CC.3.1). dcm4che passes
  ``UID.UnifiedProcedureStepPush`` as the *cuid* of ``naction/nset/nget``;
  tdwii_plus_examples ``upswatchnactionscu.py`` passes ``class_uid=UnifiedProcedureStepPush,
  meta_uid=UnifiedProcedureStepWatch``. In pynetdicom 3.0.4 ``meta_uid`` selects the
  presentation context (``Association._get_valid_context``) and ``class_uid`` goes into the
  message, so ``meta_uid`` is always passed explicitly (its Push fallback only knows the final
  UIDs).
* C-FIND: the Affected SOP Class UID is the context's own class (CC.2.8.1.2.1).
* The ``legacy`` option puts the context's own SOP Class in the Requested SOP Class UID (what
  tdwii's ``upspullnactionscu.py`` does for Change State); it exists so that tests can show
  what a strict SCP does with that form. It is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from .ups_rules import code_item, tag_of
from .ups_uids import (
    GLOBAL_SUBSCRIPTION,
    IN_PROGRESS,
    SCHEDULED,
    VERIFICATION,
    ActionType,
    UidSet,
    uid_set,
)


@dataclass
class ScuResult:
    """The outcome of one request.

    ``sop_class_uid`` is the Requested (N-ACTION/N-SET/N-GET) or Affected (N-CREATE, C-FIND)
    SOP Class UID that was put in the request; ``context_uid`` the abstract syntax of the
    presentation context it went on. ``matches`` holds the C-FIND pending identifiers.
    """

    status: int
    error_comment: str = ""
    dataset: Dataset | None = None
    sop_class_uid: str = ""
    context_uid: str = ""
    matches: list[Dataset] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 0x0000

    @property
    def is_warning(self) -> bool:
        return self.status == 0x0001 or (self.status & 0xF000) == 0xB000


def _status_of(status: Dataset | None) -> tuple[int, str]:
    if status is None or "Status" not in status:
        return 0xFFFF, "no response (association aborted or timed out)"
    return int(status.Status), str(status.get("ErrorComment", ""))


class UpsScu:
    """A UPS SCU with one association; use as a context manager or call open()/close()."""

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str = "UPS_SCP",
        calling_ae: str = "UPS_SCU",
        uid_set: str | UidSet = "final",
        dimse_timeout: float = 30,
        acse_timeout: float = 30,
        legacy: bool = False,
    ) -> None:
        self.host, self.port = host, port
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.uids = _resolve(uid_set)
        self.legacy = legacy
        self.ae = AE(ae_title=calling_ae)
        self.ae.acse_timeout = acse_timeout
        self.ae.dimse_timeout = dimse_timeout
        self.ae.network_timeout = dimse_timeout
        for uid in (self.uids.push, self.uids.pull, self.uids.watch, VERIFICATION):
            self.ae.add_requested_context(uid)
        self.assoc: Association | None = None
        self._msg_id = 0

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 65535 + 1
        return self._msg_id

    # ------------------------------------------------------------------ association
    def open(self) -> UpsScu:
        assoc = self.ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise ConnectionError(f"association with {self.called_ae} refused or aborted")
        self.assoc = assoc
        return self

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None

    def __enter__(self) -> UpsScu:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def accepted_contexts(self) -> list[str]:
        return [str(cx.abstract_syntax) for cx in self._assoc().accepted_contexts]

    def _assoc(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            self.open()
        assert self.assoc is not None
        return self.assoc

    def _context(self, name: str) -> str:
        return getattr(self.uids, name)

    def _class_for(self, context: str, legacy: bool | None) -> str:
        use_legacy = self.legacy if legacy is None else legacy
        return context if use_legacy else self.uids.push

    # ------------------------------------------------------------------ services
    def echo(self) -> ScuResult:
        status = self._assoc().send_c_echo(msg_id=self._next_id())
        code, comment = _status_of(status)
        return ScuResult(code, comment, None, VERIFICATION, VERIFICATION)

    def find(self, identifier: Dataset, context: str = "pull") -> ScuResult:
        """C-FIND (CC.2.8) on the Pull (or Watch) context; returns matches and final status."""
        cx = self._context(context)
        result = ScuResult(0xFFFF, sop_class_uid=cx, context_uid=cx)
        for status, ds in self._assoc().send_c_find(identifier, cx, msg_id=self._next_id()):
            code, comment = _status_of(status)
            if code in (0xFF00, 0xFF01):
                result.matches.append(ds)
                continue
            result.status, result.error_comment = code, comment
        return result

    def create(self, uid: str, attributes: Dataset, strip_instance_uid: bool = True) -> ScuResult:
        """N-CREATE (CC.2.5) with Affected SOP Instance UID = ``uid`` on the Push context.

        The SOP Instance UID travels in the command, not in the data set (PS3.7 10.1.5).
        """
        ds = Dataset()
        ds.update(attributes)
        if strip_instance_uid and "SOPInstanceUID" in ds:
            del ds.SOPInstanceUID
        cx = self.uids.push
        status, reply = self._assoc().send_n_create(
            ds, cx, uid, msg_id=self._next_id(), meta_uid=cx
        )
        code, comment = _status_of(status)
        return ScuResult(code, comment, reply, cx, cx)

    def action(
        self,
        action: ActionType | int,
        instance_uid: str,
        info: Dataset | None,
        context: str = "watch",
        legacy: bool | None = None,
    ) -> ScuResult:
        """A raw N-ACTION, for requests the typed methods do not build."""
        return self._action(action, instance_uid, info, context, legacy)

    def _action(
        self,
        action: ActionType | int,
        instance_uid: str,
        info: Dataset | None,
        context: str,
        legacy: bool | None,
    ) -> ScuResult:
        cx = self._context(context)
        cls = self._class_for(cx, legacy)
        # An empty Action Information is sent as none: pynetdicom would announce a data set
        # and send zero bytes of it, and the peer would wait for it.
        data = info if info is not None and len(info) else None
        status, reply = self._assoc().send_n_action(
            data, int(action), cls, instance_uid, msg_id=self._next_id(), meta_uid=cx
        )
        code, comment = _status_of(status)
        return ScuResult(code, comment, reply, cls, cx)

    def change_state(
        self,
        uid: str,
        state: str,
        transaction_uid: str | None,
        legacy: bool | None = None,
        context: str = "pull",
    ) -> ScuResult:
        """N-ACTION Change UPS State (Action Type 1, Table CC.2.1-1) on the Pull context."""
        info = Dataset()
        info.ProcedureStepState = state
        if transaction_uid is not None:
            info.TransactionUID = transaction_uid
        return self._action(ActionType.CHANGE_STATE, uid, info, context, legacy)

    def claim(self, uid: str, legacy: bool | None = None) -> tuple[ScuResult, str]:
        """Take control of a SCHEDULED UPS: new Transaction UID, then IN PROGRESS (CC.2.1.2)."""
        transaction_uid = generate_uid()
        return self.change_state(uid, IN_PROGRESS, transaction_uid, legacy), transaction_uid

    def request_cancel(
        self,
        uid: str,
        reason: str | None = None,
        reason_code: tuple[str, str, str] | Dataset | None = None,
        contact_uri: str | None = None,
        contact_name: str | None = None,
        context: str = "push",
        legacy: bool | None = None,
    ) -> ScuResult:
        """N-ACTION Request UPS Cancel (Action Type 2, Table CC.2.2-1)."""
        info = Dataset()
        if reason is not None:
            info.ReasonForCancellation = reason
        if reason_code is not None:
            item = reason_code if isinstance(reason_code, Dataset) else code_item(*reason_code)
            info.ProcedureStepDiscontinuationReasonCodeSequence = [item]
        if contact_uri is not None:
            info.ContactURI = contact_uri
        if contact_name is not None:
            info.ContactDisplayName = contact_name
        return self._action(ActionType.REQUEST_CANCEL, uid, info, context, legacy)

    def set(
        self,
        uid: str,
        modifications: Dataset,
        transaction_uid: str | None = None,
        legacy: bool | None = None,
        context: str = "pull",
    ) -> ScuResult:
        """N-SET (CC.2.6) on the Pull context; ``transaction_uid`` is added when given."""
        ds = Dataset()
        ds.update(modifications)
        if transaction_uid is not None:
            ds.TransactionUID = transaction_uid
        cx = self._context(context)
        cls = self._class_for(cx, legacy)
        status, reply = self._assoc().send_n_set(ds, cls, uid, msg_id=self._next_id(), meta_uid=cx)
        code, comment = _status_of(status)
        return ScuResult(code, comment, reply, cls, cx)

    def get(
        self,
        uid: str,
        tags: list[int | str],
        context: str = "push",
        legacy: bool | None = None,
    ) -> ScuResult:
        """N-GET (CC.2.7); ``tags`` are tags or keywords."""
        cx = self._context(context)
        cls = self._class_for(cx, legacy)
        status, reply = self._assoc().send_n_get(
            [tag_of(t) for t in tags], cls, uid, msg_id=self._next_id(), meta_uid=cx
        )
        code, comment = _status_of(status)
        return ScuResult(code, comment, reply, cls, cx)

    def _instance(self, uid_or_global: str) -> str:
        return GLOBAL_SUBSCRIPTION if uid_or_global == "global" else uid_or_global

    def subscribe(
        self,
        uid_or_global: str = "global",
        receiving_ae: str | None = None,
        deletion_lock: bool = False,
        matching_keys: Dataset | None = None,
        legacy: bool | None = None,
    ) -> ScuResult:
        """Action Type 3 on the Watch context (CC.2.3.2); "global" = the well-known UID."""
        info = Dataset()
        info.ReceivingAE = receiving_ae or self.calling_ae
        info.DeletionLock = "TRUE" if deletion_lock else "FALSE"
        if matching_keys is not None:
            info.update(matching_keys)
        return self._action(
            ActionType.SUBSCRIBE, self._instance(uid_or_global), info, "watch", legacy
        )

    def unsubscribe(
        self,
        uid_or_global: str = "global",
        receiving_ae: str | None = None,
        legacy: bool | None = None,
    ) -> ScuResult:
        """Action Type 4 on the Watch context (CC.2.3.2)."""
        info = Dataset()
        info.ReceivingAE = receiving_ae or self.calling_ae
        return self._action(
            ActionType.UNSUBSCRIBE, self._instance(uid_or_global), info, "watch", legacy
        )

    def suspend_global(
        self, receiving_ae: str | None = None, legacy: bool | None = None
    ) -> ScuResult:
        """Action Type 5 on the global well-known UID (CC.2.3.2)."""
        info = Dataset()
        info.ReceivingAE = receiving_ae or self.calling_ae
        return self._action(ActionType.SUSPEND_GLOBAL, GLOBAL_SUBSCRIPTION, info, "watch", legacy)


def _resolve(value: str | UidSet) -> UidSet:
    return uid_set(value)


# ---------------------------------------------------------------------- dataset helpers
def worklist_query(
    station: str | None = None,
    state: str | None = SCHEDULED,
    start_range: str | None = None,
    patient_id: str | None = None,
    sop_instance_uid: str | None = None,
    workitem_code: tuple[str, str] | None = None,
) -> Dataset:
    """A "Worklist" search Identifier (CC.2.8.3.1) with the usual return keys.

    Modelled on the RO-58 query of tdwii_plus_examples ``upspullcfindscu.py``: the station is
    matched by Code Value only, Code Meaning is never a matching key.
    """
    q = Dataset()
    q.SOPInstanceUID = sop_instance_uid or ""
    q.ProcedureStepState = state or ""
    q.ScheduledProcedureStepPriority = ""
    q.ProcedureStepLabel = ""
    q.WorklistLabel = ""
    q.InputReadinessState = ""
    q.ScheduledProcedureStepStartDateTime = start_range or ""
    q.PatientName = ""
    q.PatientID = patient_id or ""
    station_item = Dataset()
    if station:
        station_item.CodeValue = station
    q.ScheduledStationNameCodeSequence = [station_item] if station else []
    work_item = Dataset()
    if workitem_code:
        work_item.CodeValue, work_item.CodingSchemeDesignator = workitem_code
    q.ScheduledWorkitemCodeSequence = [work_item] if workitem_code else []
    q.ScheduledProcessingParametersSequence = []
    q.InputInformationSequence = []
    return q


def ups_attributes(
    label: str = "Fraction 1",
    station: tuple[str, str, str] | None = ("TB1", "99TMS", "Linac TB1"),
    start: str = "20300101080000",
    patient_id: str = "PAT-1",
    patient_name: str = "Peer^Test",
    priority: str = "MEDIUM",
    readiness: str = "READY",
    performers: list[Dataset] | None = None,
    **extra: Any,
) -> Dataset:
    """A complete N-CREATE data set for an RT treatment UPS (Table CC.2.5-3, N-CREATE column)."""
    ds = Dataset()
    ds.TransactionUID = ""
    ds.ScheduledProcedureStepPriority = priority
    ds.ProcedureStepLabel = label
    ds.WorklistLabel = "Peer worklist"
    ds.ScheduledProcessingParametersSequence = []
    ds.ScheduledStationNameCodeSequence = [code_item(*station)] if station else []
    ds.ScheduledStationClassCodeSequence = []
    ds.ScheduledStationGeographicLocationCodeSequence = []
    ds.ScheduledHumanPerformersSequence = performers or []
    ds.ScheduledProcedureStepStartDateTime = start
    ds.ScheduledWorkitemCodeSequence = [
        code_item("121726", "DCM", "RT Treatment with Internal Verification")
    ]
    ds.CommentsOnTheScheduledProcedureStep = ""
    ds.InputReadinessState = readiness
    ds.InputInformationSequence = []
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = []
    ds.AdmittingDiagnosesDescription = ""
    ds.AdmittingDiagnosesCodeSequence = []
    ds.ReferencedRequestSequence = []
    ds.ProcedureStepState = SCHEDULED
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def progress_update(percent: float, description: str = "") -> Dataset:
    """An N-SET Modification List carrying Procedure Step Progress (Table CC.2.5-3)."""
    item = Dataset()
    item.ProcedureStepProgress = percent
    if description:
        item.ProcedureStepProgressDescription = description
    ds = Dataset()
    ds.ProcedureStepProgressInformationSequence = [item]
    return ds


def completion_attributes(
    start: str = "20300101080500",
    end: str = "20300101081500",
    station: tuple[str, str, str] = ("TB1", "99TMS", "Linac TB1"),
) -> Dataset:
    """N-SET data meeting the COMPLETED Final State requirements (CC.2.5.1.1, code "P")."""
    item = Dataset()
    item.PerformedProcedureStepStartDateTime = start
    item.PerformedProcedureStepEndDateTime = end
    item.PerformedStationNameCodeSequence = [code_item(*station)]
    item.PerformedWorkitemCodeSequence = [
        code_item("121726", "DCM", "RT Treatment with Internal Verification")
    ]
    item.OutputInformationSequence = []
    ds = Dataset()
    ds.UnifiedProcedureStepPerformedProcedureSequence = [item]
    return ds


def cancellation_attributes(
    when: str = "20300101081000",
    reason: tuple[str, str, str] = ("110513", "DCM", "Discontinued for unspecified reason"),
    text: str | None = "Stopped by the operator",
    progress: float | None = None,
) -> Dataset:
    """N-SET data meeting the CANCELED Final State requirements (CC.2.5.1.1, code "X")."""
    item = Dataset()
    item.ProcedureStepCancellationDateTime = when
    item.ProcedureStepDiscontinuationReasonCodeSequence = [code_item(*reason)]
    if text:
        item.ReasonForCancellation = text
    if progress is not None:
        item.ProcedureStepProgress = progress
    ds = Dataset()
    ds.ProcedureStepProgressInformationSequence = [item]
    return ds
