"""A small UPS SCU written from the seed and PS3.4 Annex CC, independent of emulator/.

It negotiates UPS Pull, sends N-ACTION/N-SET/N-GET with the Push SOP Class (seed RO-19,
spec-notes), and returns raw statuses so tests can compare them with the state table.
"""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_context

PUSH = {"final": "1.2.840.10008.5.1.4.34.6.1", "trial": "1.2.840.10008.5.1.4.34.4.1"}
PULL = {"final": "1.2.840.10008.5.1.4.34.6.3", "trial": "1.2.840.10008.5.1.4.34.4.3"}
WATCH = {"final": "1.2.840.10008.5.1.4.34.6.2", "trial": "1.2.840.10008.5.1.4.34.4.2"}
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"  # PS3.4 CC.2.3.1 well-known instance
RO17_KEYS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "ProcedureStepState",
    "ProcedureStepLabel",
    "ScheduledProcedureStepStartDateTime",
    "ScheduledWorkitemCodeSequence",
    "ScheduledProcessingParametersSequence",
    "InputInformationSequence",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
]


class UpsClient:
    def __init__(
        self,
        host: str,
        port: int,
        called: str = "TMS",
        calling: str = "DEVICE",
        uids: str = "final",
    ) -> None:
        self.ae = AE(ae_title=calling)
        self.ae.requested_contexts = [build_context(PULL[uids]), build_context(WATCH[uids])]
        self.ae.dimse_timeout = 30
        self.push, self.pull, self.watch = PUSH[uids], PULL[uids], WATCH[uids]
        self.assoc = self.ae.associate(host, port, ae_title=called)
        self.last_error_comment = ""
        assert self.assoc.is_established, "association with the TMS failed"

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self) -> UpsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worklist(self, station: str = "", state: str = "SCHEDULED", **keys) -> list[Dataset]:
        # Today, reaching back an hour: a session the TMS seeded just before midnight
        # (it keeps a session's four steps on one day) is today's work just after it.
        now = dt.datetime.now()
        first = min(dt.datetime.combine(now.date(), dt.time(0, 0)), now - dt.timedelta(hours=1))
        ident = Dataset()
        for keyword in RO17_KEYS:
            setattr(ident, keyword, [] if keyword.endswith("Sequence") else "")
        ident.ProcedureStepState = state
        ident.ScheduledProcedureStepStartDateTime = f"{first:%Y%m%d%H%M%S}-{now:%Y%m%d}235959"
        station_item = Dataset()
        station_item.CodeValue = station
        station_item.CodingSchemeDesignator = ""
        station_item.CodeMeaning = ""
        ident.ScheduledStationNameCodeSequence = Sequence([station_item])
        ident.TransactionUID = ""  # asked for, must never be returned
        for keyword, value in keys.items():
            setattr(ident, keyword, value)
        return self.find(ident)

    def find(self, ident: Dataset) -> list[Dataset]:
        found, final = [], None
        for status, identifier in self.assoc.send_c_find(ident, self.pull):
            if status.Status in (0xFF00, 0xFF01):
                found.append(identifier)
            else:
                final = status.Status
        if final != 0x0000:
            raise RuntimeError(f"C-FIND ended with 0x{final:04X}")
        return found

    def find_status(self, ident: Dataset) -> int:
        statuses = [s.Status for s, _ in self.assoc.send_c_find(ident, self.pull)]
        return statuses[-1]

    def change_state(
        self, uid: str, state: str, transaction_uid: str | None, **extra
    ) -> tuple[int, Dataset | None]:
        info = Dataset()
        info.ProcedureStepState = state
        if transaction_uid is not None:
            info.TransactionUID = transaction_uid
        for keyword, value in extra.items():
            setattr(info, keyword, value)
        status, reply = self.assoc.send_n_action(info, 1, self.push, uid, meta_uid=self.pull)
        self.last_error_comment = str(status.get("ErrorComment", "") or "")
        return status.Status, reply

    def request_cancel(self, uid: str, reason: str = "") -> int:
        # No reason means no Action Information at all: pynetdicom announces a data set for
        # an empty Dataset and then sends nothing, which leaves any SCP waiting.
        info = None
        if reason:
            info = Dataset()
            info.ReasonForCancellation = reason
        # Request Cancel travels on UPS Push or UPS Watch (PS3.4 Tables CC.2-1, CC.2-3),
        # naming UPS Push (CC.3.1).
        status, _ = self.assoc.send_n_action(info, 2, self.push, uid, meta_uid=self.watch)
        return status.Status

    def subscribe(self, uid: str, receiving_ae: str, deletion_lock: bool = False) -> int:
        """UPS Watch N-ACTION 3 (PS3.4 CC.2.3.1) on one UPS or GLOBAL_SUBSCRIPTION."""
        info = Dataset()
        info.ReceivingAE = receiving_ae
        info.DeletionLock = "TRUE" if deletion_lock else "FALSE"
        status, _ = self.assoc.send_n_action(info, 3, self.push, uid, meta_uid=self.watch)
        return status.Status

    def unsubscribe(self, uid: str, receiving_ae: str) -> int:
        info = Dataset()
        info.ReceivingAE = receiving_ae
        status, _ = self.assoc.send_n_action(info, 4, self.push, uid, meta_uid=self.watch)
        return status.Status

    def n_set(self, uid: str, modifications: Dataset) -> int:
        status, _ = self.assoc.send_n_set(modifications, self.push, uid, meta_uid=self.pull)
        return status.Status

    def n_get(self, uid: str, tags: list | None = None) -> tuple[int, Dataset | None]:
        status, reply = self.assoc.send_n_get(tags or [], self.push, uid, meta_uid=self.pull)
        return status.Status, reply


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def progress(transaction_uid: str, percent: float, beam: int | None = None) -> Dataset:
    """RO-26 progress N-SET body (seed Table 3.26-1, final-standard tags)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    info = Dataset()
    info.ProcedureStepProgress = percent
    ds.ProcedureStepProgressInformationSequence = Sequence([info])
    if beam is not None:
        parameter = Dataset()
        parameter.ValueType = "TEXT"
        parameter.ConceptNameCodeSequence = Sequence(
            [code("121700", "DCM", "Referenced Beam Number in Progress")]
        )
        parameter.TextValue = str(beam)
        performed = Dataset()
        performed.PerformedProcessingParametersSequence = Sequence([parameter])
        performed.OutputInformationSequence = Sequence([])
        performed.NonDICOMOutputCodeSequence = Sequence([])
        ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return ds


# CID 9300 "Procedure Discontinuation Reasons" (PS3.16), written out here so the client
# stays independent of emulator/: (110501, DCM, "Equipment failure").
EQUIPMENT_FAILURE = ("110501", "DCM", "Equipment failure")


def cancellation(transaction_uid: str, percent: float, reason: str) -> Dataset:
    """The N-SET before CANCELED: every Final State X attribute of PS3.4 Table CC.2.5-3
    (progress item, cancellation date-time, coded discontinuation reason)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    info = Dataset()
    info.ProcedureStepProgress = round(percent, 2)
    info.ProcedureStepCancellationDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    info.ReasonForCancellation = reason
    info.ProcedureStepDiscontinuationReasonCodeSequence = Sequence([code(*EQUIPMENT_FAILURE)])
    ds.ProcedureStepProgressInformationSequence = Sequence([info])
    return ds


def final_update(
    transaction_uid: str, workitem: Dataset, station: str, outputs: list[Dataset] | None = None
) -> Dataset:
    """RO-21 final update body (seed Table 3.21-1, final-standard tags)."""
    now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    performed = Dataset()
    performed.PerformedStationNameCodeSequence = Sequence(
        [code(station, "99DEVICE", "Performed Station Name")]
    )
    performed.PerformedProcedureStepStartDateTime = now
    performed.PerformedProcedureStepEndDateTime = now
    performed.PerformedWorkitemCodeSequence = Sequence([workitem])
    performed.OutputInformationSequence = Sequence(outputs or [])
    performed.NonDICOMOutputCodeSequence = Sequence([])
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return ds
