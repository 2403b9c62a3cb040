"""A strict TMS written from the seed (RO-17..RO-26) and PS3.4 Annex CC, not from emulator/.

It serves a fixed worklist of four UPS and records every deviation of the performer's
messages from the seed's tables as a violation naming the clause. Tests run a device
against it and require no violations.
"""

from __future__ import annotations

import threading
from copy import deepcopy

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    Verification,
)

SEED_BEAM_CONCEPT = ("121700", "DCM", "Referenced Beam Number in Progress")


class StrictTms:
    def __init__(self, ups: list[Dataset], transient: dict[str, Dataset], peers: dict) -> None:
        self.ups = {str(u.SOPInstanceUID): deepcopy(u) for u in ups}
        self.transaction: dict[str, str] = {}
        self.transient = transient
        self.peers = peers
        self.violations: list[str] = []
        self.beam_reported: set[str] = set()
        self.progress_sets: dict[str, int] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title="STRICT")
        ae.add_supported_context(UnifiedProcedureStepPull)
        ae.add_supported_context(UnifiedProcedureStepPush)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_FIND, self.on_find),
                (evt.EVT_N_ACTION, self.on_action),
                (evt.EVT_N_SET, self.on_set),
                (evt.EVT_C_MOVE, self.on_move),
            ],
        )
        self.address = self.server.server_address[:2]

    def stop(self) -> None:
        self.server.shutdown()

    def violation(self, clause: str, text: str) -> None:
        with self.lock:
            self.violations.append(f"{clause}: {text}")

    # RO-17
    def on_find(self, event):
        ident = event.identifier
        if event.context.abstract_syntax != UnifiedProcedureStepPull:
            self.violation("RO-17 3.17.4.1.2", "C-FIND not on the UPS Pull SOP Class")
        if ident.get("ProcedureStepState") != "SCHEDULED":
            self.violation("RO-17 Note 1", "Procedure Step State must be SCHEDULED")
        station = ident.get("ScheduledStationNameCodeSequence") or []
        if not station or not station[0].get("CodeValue"):
            self.violation("RO-17 Table 3.17-1", "no Scheduled Station Name code value")
        if "-" not in str(ident.get("ScheduledProcedureStepStartDateTime", "")):
            self.violation("RO-17 Note 5", "no start date-time range")
        for keyword, note in (
            ("ScheduledWorkitemCodeSequence", "Note 6"),
            ("ScheduledProcessingParametersSequence", "Note 7"),
        ):
            if keyword not in ident or len(ident[keyword].value) != 0:
                self.violation(f"RO-17 {note}", f"{keyword} must be sent empty")
        for keyword in (
            "ProcedureStepLabel",
            "InputInformationSequence",
            "PatientName",
            "PatientID",
        ):
            if keyword not in ident:
                self.violation("RO-17 Table 3.17-1", f"return key {keyword} missing")
        code = station[0].get("CodeValue") if station else None
        for ups in self.ups.values():
            if ups.ProcedureStepState == "SCHEDULED" and (
                code == ups.ScheduledStationNameCodeSequence[0].CodeValue
            ):
                yield 0xFF00, ups
        yield 0x0000, None

    def _check_class(self, event, clause: str) -> None:
        if event.request.RequestedSOPClassUID != UnifiedProcedureStepPush:
            self.violation(clause, "Requested SOP Class must be UPS Push")

    # RO-19, RO-25
    def on_action(self, event):
        self._check_class(event, "RO-19 3.19.4.1")
        uid = str(event.request.RequestedSOPInstanceUID)
        info = event.action_information
        ups = self.ups.get(uid)
        if ups is None:
            return 0xC307, None
        state = info.get("ProcedureStepState")
        reply = Dataset()
        if state == "IN PROGRESS":
            if info.get("TransactionUID", "") not in ("", None):
                self.violation("RO-19 3.19.4.1.2", "Transaction UID must be sent zero length")
            if ups.ProcedureStepState != "SCHEDULED":
                return 0xC302, None
            self.transaction[uid] = str(generate_uid())
            ups.ProcedureStepState = "IN PROGRESS"
            reply.ProcedureStepState = "IN PROGRESS"
            reply.TransactionUID = self.transaction[uid]
            return 0x0000, reply
        if info.get("TransactionUID") != self.transaction.get(uid):
            self.violation("RO-25 3.25.4.1.3", "wrong Transaction UID")
            return 0xC301, None
        if state == "COMPLETED":
            performed = (ups.get("UnifiedProcedureStepPerformedProcedureSequence") or [None])[0]
            self._check_final(uid, performed)
            if ups.ScheduledWorkitemCodeSequence[0].CodeValue == "121726" and (
                uid not in self.beam_reported
            ):
                self.violation("RO-26 Table 3.26-1", "no N-SET named the beam in progress")
        elif state == "CANCELED":
            missing = _missing_for_canceled(ups)
            if missing:
                self.violation("PS3.4 Table CC.2.5-3 (X)", f"CANCELED without {missing}")
                return 0xC304, None
        else:
            self.violation("RO-25 3.25.4.1.2", f"state {state!r}")
            return 0x0106, None
        ups.ProcedureStepState = state
        reply.ProcedureStepState = state
        return 0x0000, reply

    def _check_final(self, uid: str, performed) -> None:
        clause = "RO-21 Table 3.21-1"
        if performed is None:
            self.violation(clause, "no UPS Performed Procedure Sequence before COMPLETED")
            return
        station = performed.get("PerformedStationNameCodeSequence") or []
        if not station or station[0].get("CodeMeaning") != "Performed Station Name":
            self.violation(clause, "Performed Station Name code missing or wrong meaning")
        for keyword in ("PerformedProcedureStepStartDateTime", "PerformedProcedureStepEndDateTime"):
            if not performed.get(keyword):
                self.violation(clause, f"{keyword} missing")
        workitem = performed.get("PerformedWorkitemCodeSequence") or []
        if not workitem or workitem[0].get("CodingSchemeDesignator") != "DCM":
            self.violation(clause, "Performed Workitem code must be DCM")
        if "OutputInformationSequence" not in performed:
            self.violation(clause, "Output Information Sequence missing")
        if "NonDICOMOutputCodeSequence" not in performed or len(
            performed.NonDICOMOutputCodeSequence
        ):
            self.violation(clause, "Non-DICOM Output must be present and empty")

    # RO-21, RO-26
    def on_set(self, event):
        self._check_class(event, "RO-21 3.21.4.1.2")
        uid = str(event.request.RequestedSOPInstanceUID)
        mods = event.modification_list
        ups = self.ups.get(uid)
        if ups is None:
            return 0xC307, None
        if ups.ProcedureStepState != "IN PROGRESS":
            return 0xC310, None
        if mods.get("TransactionUID") != self.transaction.get(uid):
            self.violation("RO-21 3.21.4.1.3", "Transaction UID not supplied")
            return 0xC301, None
        if "ProcedureStepState" in mods:
            self.violation("RO-21 Table 3.21-1", "N-SET tried to change the state")
        performed = (mods.get("UnifiedProcedureStepPerformedProcedureSequence") or [None])[0]
        is_final = performed is not None and "PerformedStationNameCodeSequence" in performed
        if not is_final and "ProcedureStepProgressInformationSequence" not in mods:
            self.violation("RO-26 Table 3.26-1", "progress N-SET without progress information")
        if performed is not None and not is_final:
            for parameter in performed.get("PerformedProcessingParametersSequence") or []:
                concept = parameter.ConceptNameCodeSequence[0]
                seen = (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning)
                if seen != SEED_BEAM_CONCEPT or parameter.ValueType != "TEXT":
                    self.violation("RO-26 Table 3.26-1", f"beam concept {seen}")
                elif not str(parameter.TextValue).isdigit():
                    self.violation("RO-26 Table 3.26-1", "beam number is not an integer string")
                else:
                    self.beam_reported.add(uid)
            for keyword in ("OutputInformationSequence", "NonDICOMOutputCodeSequence"):
                if keyword in performed and len(performed[keyword].value):
                    self.violation("RO-26 Table 3.26-1", f"{keyword} must be empty")
        for element in mods:
            if element.keyword != "TransactionUID":
                ups[element.tag] = deepcopy(element)
        return 0x0000, None

    # RO-20
    def on_move(self, event):
        peer = self.peers.get(event.move_destination.strip())
        if peer is None:
            yield None, None
            return
        wanted = event.identifier.SOPInstanceUID
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        found = [self.transient[u] for u in wanted if u in self.transient]
        contexts = [build_context(uid) for uid in {str(ds.SOPClassUID) for ds in found}]
        yield (*peer, {"contexts": contexts or [build_context(Verification)]})
        yield len(found)
        for ds in found:
            yield 0xFF00, ds


def _missing_for_canceled(ups: Dataset) -> list[str]:
    """PS3.4 Table CC.2.5-3, Final State code X, read from the standard for this test: the
    progress item, its cancellation date-time and a CID 9300 (DCM 1105xx) coded reason."""
    items = ups.get("ProcedureStepProgressInformationSequence") or []
    if not items:
        return ["ProcedureStepProgressInformationSequence"]
    missing = []
    if not items[0].get("ProcedureStepCancellationDateTime"):
        missing.append("ProcedureStepCancellationDateTime")
    reasons = items[0].get("ProcedureStepDiscontinuationReasonCodeSequence") or []
    coded = [
        r
        for r in reasons
        if r.get("CodingSchemeDesignator") == "DCM" and str(r.get("CodeValue")).startswith("1105")
    ]
    if not coded:
        missing.append("ProcedureStepDiscontinuationReasonCodeSequence")
    return missing
