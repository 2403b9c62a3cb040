"""The tables of PS3.4 Annex CC as data, and C-FIND matching (PS3.4 C.2.2.2).

Where the text could be read it is cited. Where a table could not be read in full (Table
CC.1.1-2 and Table CC.2.3-2 are only present as images/long tables in the stored pages) the
reading is reconstructed from the normative sentences around it and cross-checked against
public implementations; each such place says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from .ups_uids import CANCELED, COMPLETED, IN_PROGRESS, SCHEDULED, STATES, ActionType

# --------------------------------------------------------------------------------------
# Table CC.1.1-2 (state transitions) with the statuses of Table CC.2.1-2.
#
# The table itself was not readable as text. This encoding follows: CC.2.1.3 ("The SCP shall
# only perform legal state changes", "shall refuse requests to change the state of an IN
# PROGRESS UPS unless the Transaction UID ... is provided", "shall refuse ... to COMPLETED or
# CANCELED if the Final State requirements ... have not been met"), the meanings of the
# statuses in Table CC.2.1-2, the summary in /work/shared/spec-notes.md, and the state table
# of tdwii_plus_examples (cli/upsscp/handlers.py) and dcm4chee-arc (UPSServiceEJB).
#
# The Transaction UID given in the request is classified as:
#   "missing"    - absent or empty,
#   "unrecorded" - given, but the UPS has no recorded Transaction UID (e.g. SCHEDULED),
#   "right"      - equal to the recorded one,
#   "wrong"      - different from the recorded one.
# --------------------------------------------------------------------------------------
RECORD_TRANSACTION_UID = "record the Transaction UID, change to IN PROGRESS"
CHECK_FINAL_STATE = "change state if the Final State requirements are met, else C304"


@dataclass(frozen=True)
class StateRow:
    requested: str
    uid_classes: tuple[str, ...]
    outcome: dict[str, int | str]  # current state -> status or action


def _all(value: int | str) -> dict[str, int | str]:
    return dict.fromkeys(STATES, value)


STATE_TABLE: tuple[StateRow, ...] = (
    StateRow(SCHEDULED, ("missing", "unrecorded", "right", "wrong"), _all(0xC303)),
    StateRow(
        IN_PROGRESS,
        ("missing",),
        {SCHEDULED: 0xC301, IN_PROGRESS: 0xC302, COMPLETED: 0xC300, CANCELED: 0xC300},
    ),
    StateRow(
        IN_PROGRESS,
        ("unrecorded", "right", "wrong"),
        {
            SCHEDULED: RECORD_TRANSACTION_UID,
            IN_PROGRESS: 0xC302,
            COMPLETED: 0xC300,
            CANCELED: 0xC300,
        },
    ),
    StateRow(
        COMPLETED,
        ("right", "unrecorded"),
        {SCHEDULED: 0xC310, IN_PROGRESS: CHECK_FINAL_STATE, COMPLETED: 0xB306, CANCELED: 0xC300},
    ),
    StateRow(
        CANCELED,
        ("right", "unrecorded"),
        {SCHEDULED: 0xC310, IN_PROGRESS: CHECK_FINAL_STATE, COMPLETED: 0xC300, CANCELED: 0xB304},
    ),
    StateRow(COMPLETED, ("wrong", "missing"), _all(0xC301)),
    StateRow(CANCELED, ("wrong", "missing"), _all(0xC301)),
)


def classify_transaction_uid(given: str | None, recorded: str | None) -> str:
    if not given:
        return "missing"
    if not recorded:
        return "unrecorded"
    return "right" if given == recorded else "wrong"


def state_transition(current: str, requested: str, uid_class: str) -> int | str:
    """Look up Table CC.1.1-2: a status code, or one of the two action strings."""
    for row in STATE_TABLE:
        if row.requested == requested and uid_class in row.uid_classes:
            return row.outcome[current]
    return 0x0115  # PS3.7 "Invalid argument value": not one of the four states


# --------------------------------------------------------------------------------------
# Table CC.2.3-2 (subscription state transitions), read from CC.2.3 / CC.2.3.2 / CC.2.3.3 /
# CC.2.4.3. The table body was not readable; its rules as encoded here:
#
# * "In general, instance specific instructions take precedence over global instructions.
#   The exception is the Unsubscribe Globally ..." (CC.2.3): a global subscribe does not
#   change an instance that already has a UPS Subscription State; Unsubscribe Globally
#   (Action 4 on the well-known UID) also removes every instance subscription of the AE.
# * Global subscription covers "all current and subsequently created UPS instances"
#   (CC.2.3.2), with or without lock.
# * Suspend Global Subscription (Action 5) only stops subscribing to new UPS instances
#   (tdwii_plus_examples upswatchnactionscu.py; dcm4chee-arc suspendGlobalSubscription).
# * Initial State Reports (CC.2.4.3): after every subscribe to a specific instance; after a
#   global subscribe **with** Deletion Lock, for every UPS instance managed by the SCP; after
#   creating a UPS, to every AE with a Global Subscription (with or without lock). A global
#   subscribe **without** lock sends no initial reports (dcm4chee-arc agrees).
# --------------------------------------------------------------------------------------
NOT_SUBSCRIBED = "Not Subscribed"
WITH_LOCK = "Subscribed with Lock"
WITHOUT_LOCK = "Subscribed w/o Lock"
NO_GLOBAL = "No Global Subscription"
GLOBAL_WITH_LOCK = "Global Subscription with Lock"
GLOBAL_WITHOUT_LOCK = "Global Subscription w/o Lock"
UNCHANGED = None


@dataclass(frozen=True)
class SubscriptionRow:
    event: str
    new_global_state: str | None  # None: the Global Subscription State does not change
    instance: dict[str, tuple[str, bool]]  # current -> (new UPS Subscription State, report?)


def _same(report: bool) -> dict[str, tuple[str, bool]]:
    return {s: (s, report) for s in (NOT_SUBSCRIBED, WITH_LOCK, WITHOUT_LOCK)}


def _to(state: str, report: bool) -> dict[str, tuple[str, bool]]:
    return {s: (state, report) for s in (NOT_SUBSCRIBED, WITH_LOCK, WITHOUT_LOCK)}


SUBSCRIPTION_TABLE: dict[str, SubscriptionRow] = {
    row.event: row
    for row in (
        SubscriptionRow("Subscribe (instance, Lock TRUE)", UNCHANGED, _to(WITH_LOCK, True)),
        SubscriptionRow("Subscribe (instance, Lock FALSE)", UNCHANGED, _to(WITHOUT_LOCK, True)),
        SubscriptionRow("Unsubscribe (instance)", UNCHANGED, _to(NOT_SUBSCRIBED, False)),
        SubscriptionRow(
            "Subscribe Globally (Lock TRUE)",
            GLOBAL_WITH_LOCK,
            {**_same(True), NOT_SUBSCRIBED: (WITH_LOCK, True)},
        ),
        SubscriptionRow(
            "Subscribe Globally (Lock FALSE)",
            GLOBAL_WITHOUT_LOCK,
            {**_same(False), NOT_SUBSCRIBED: (WITHOUT_LOCK, False)},
        ),
        SubscriptionRow("Unsubscribe Globally", NO_GLOBAL, _to(NOT_SUBSCRIBED, False)),
        SubscriptionRow("Suspend Global Subscription", NO_GLOBAL, _same(False)),
        SubscriptionRow(
            "UPS created, Global Subscription with Lock",
            UNCHANGED,
            {NOT_SUBSCRIBED: (WITH_LOCK, True)},
        ),
        SubscriptionRow(
            "UPS created, Global Subscription w/o Lock",
            UNCHANGED,
            {NOT_SUBSCRIBED: (WITHOUT_LOCK, True)},
        ),
        SubscriptionRow(
            "UPS created, No Global Subscription",
            UNCHANGED,
            {NOT_SUBSCRIBED: (NOT_SUBSCRIBED, False)},
        ),
    )
}

# --------------------------------------------------------------------------------------
# Tables CC.2-1 .. CC.2-5: which DIMSE services each UPS SOP Class carries. A request on a
# presentation context whose SOP Class does not carry it is refused 0211H "Unrecognized
# operation" (the status dcm4chee-arc UPSPushSCP answers in that case).
# --------------------------------------------------------------------------------------
SERVICE_GROUPS: dict[tuple[str, int | None], frozenset[str]] = {
    ("N-CREATE", None): frozenset({"push"}),
    ("N-ACTION", ActionType.CHANGE_STATE): frozenset({"pull"}),
    ("N-ACTION", ActionType.REQUEST_CANCEL): frozenset({"push", "watch"}),
    ("N-ACTION", ActionType.SUBSCRIBE): frozenset({"watch"}),
    ("N-ACTION", ActionType.UNSUBSCRIBE): frozenset({"watch"}),
    ("N-ACTION", ActionType.SUSPEND_GLOBAL): frozenset({"watch"}),
    ("N-GET", None): frozenset({"push", "pull", "watch"}),
    ("N-SET", None): frozenset({"pull"}),
    ("C-FIND", None): frozenset({"pull", "watch", "query"}),
    ("N-EVENT-REPORT", None): frozenset({"event"}),
}

# --------------------------------------------------------------------------------------
# Table CC.2.5-3, the columns this SCP checks. The N-CREATE and N-SET columns were read from
# two public encodings of the table (microsoft/dicom-server WorkitemDatasetValidator, and
# dcm4chee-arc create-iod.xml / set-iod.xml), which agree on the attributes below.
# --------------------------------------------------------------------------------------
ENUMERATED_VALUES = {
    "ScheduledProcedureStepPriority": frozenset({"HIGH", "MEDIUM", "LOW"}),
    "InputReadinessState": frozenset({"INCOMPLETE", "UNAVAILABLE", "READY"}),
}
TYPE1_AT_CREATE = (
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
)
TYPE2_AT_CREATE = (
    "WorklistLabel",  # 2/1: the SCP fills it in when it is empty
    "ScheduledProcessingParametersSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledWorkitemCodeSequence",
    "CommentsOnTheScheduledProcedureStep",
    "InputInformationSequence",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReferencedRequestSequence",
    "TransactionUID",  # 2/2, and it shall be empty at creation
)
NOT_ALLOWED_AT_CREATE = ("SOPClassUID", "SOPInstanceUID")  # conveyed in the command (PS3.7)
NOT_SETTABLE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "ProcedureStepState",  # CC.2.6.2: "The SCU shall not set ... Procedure Step State"
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ReferencedRequestSequence",
    "ReplacedProcedureStepSequence",
)


def empty_keywords(ds: Dataset, keywords: Iterable[str]) -> list[str]:
    """The keywords of ``keywords`` that are present in ``ds`` with an empty value."""
    return [k for k in keywords if k in ds and ds[k].is_empty]


# --------------------------------------------------------------------------------------
# Table CC.2.5-3 "Final State" column (CC.2.5.1.1): R = required for any final state,
# P = required for COMPLETED, X = required for CANCELED. Read from spec-notes.md and
# microsoft/dicom-server WorkitemFinalStateValidatorExtension (whose codes agree). The
# first item of each sequence is checked.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinalReq:
    path: tuple[str, ...]
    need: str  # "value": non-empty; "item": sequence with an item; "code": coded item;
    #            "present": element present, may be empty


_PERFORMED = "UnifiedProcedureStepPerformedProcedureSequence"
_PROGRESS = "ProcedureStepProgressInformationSequence"
_REQUIRED_ALWAYS = tuple(
    FinalReq((k,), "value")
    for k in (
        "SOPClassUID",
        "SOPInstanceUID",
        "ScheduledProcedureStepPriority",
        "ScheduledProcedureStepModificationDateTime",
        "ScheduledProcedureStepStartDateTime",
        "InputReadinessState",
        "ProcedureStepState",
    )
)
FINAL_STATE_REQUIREMENTS: dict[str, tuple[FinalReq, ...]] = {
    COMPLETED: (
        *_REQUIRED_ALWAYS,
        FinalReq((_PERFORMED,), "item"),
        FinalReq((_PERFORMED, "PerformedProcedureStepStartDateTime"), "value"),
        FinalReq((_PERFORMED, "PerformedProcedureStepEndDateTime"), "value"),
        FinalReq((_PERFORMED, "PerformedStationNameCodeSequence"), "code"),
        FinalReq((_PERFORMED, "PerformedWorkitemCodeSequence"), "code"),
        FinalReq((_PERFORMED, "OutputInformationSequence"), "present"),
    ),
    CANCELED: (
        *_REQUIRED_ALWAYS,
        FinalReq((_PROGRESS,), "item"),
        FinalReq((_PROGRESS, "ProcedureStepCancellationDateTime"), "value"),
        FinalReq((_PROGRESS, "ProcedureStepDiscontinuationReasonCodeSequence"), "code"),
    ),
}


def is_coded(item: Dataset) -> bool:
    """A Code Sequence Macro item with Code Value (or Long/URN Code Value) and scheme."""
    value = any(item.get(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
    return bool(value and (item.get("CodingSchemeDesignator") or item.get("URNCodeValue")))


def _resolve(ds: Dataset, path: tuple[str, ...]) -> DataElement | None:
    current = ds
    for keyword in path[:-1]:
        seq = current.get(keyword)
        if not seq:
            return None
        current = seq[0]
    return current.get(tag_for_keyword(path[-1]))  # by tag: the DataElement


def unmet_final_state(ds: Dataset, state: str) -> list[str]:
    """The Final State requirements of ``state`` that ``ds`` does not meet, as paths."""
    unmet = []
    for req in FINAL_STATE_REQUIREMENTS[state]:
        elem = _resolve(ds, req.path)
        ok = elem is not None
        if ok and req.need == "value":
            ok = not elem.is_empty
        elif ok and req.need == "item":
            ok = len(elem.value or []) > 0
        elif ok and req.need == "code":
            ok = any(is_coded(item) for item in elem.value or [])
        if not ok:
            unmet.append(">".join(req.path))
    return unmet


def code_item(value: str, scheme: str = "DCM", meaning: str = "") -> Dataset:
    """A Code Sequence Macro item (PS3.3 Table 8.8-1)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# --------------------------------------------------------------------------------------
# C-FIND matching, PS3.4 C.2.2.2: single value, universal (zero length), wild card (not for
# UI, DA, DT, TM and binary VRs), range (DA, DT, TM), list of UID, sequence matching.
#
# CC.2.8.3.1 says "If there are no matching keys, then there are no matches"; it is read,
# as for the Modality Worklist, as "no entity matched the keys". A query whose keys are all
# zero length is universal and matches every UPS.
# --------------------------------------------------------------------------------------
NEVER_MATCHED = frozenset({"SpecificCharacterSet", "TimezoneOffsetFromUTC", "TransactionUID"})
_NO_WILDCARD = frozenset({"UI", "DA", "DT", "TM", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_RANGE = re.compile(r"^(\d*(?:\.\d*)?(?:[+-]\d{4})?)-(\d*(?:\.\d*)?(?:[+-]\d{4})?)$")
_WIDTH = {"DA": 8, "TM": 6, "DT": 14}  # digits before the fraction


def _values(elem: DataElement) -> list:
    value = elem.value
    if isinstance(value, (list, MultiValue)):
        return list(value)
    return [value]


def _strip_tz(text: str) -> str:
    return re.sub(r"[+-]\d{4}$", "", text) if len(text) > 5 else text


def _norm(text: str, vr: str, fill: str) -> str:
    """Pad a DA/TM/DT value so that string order is time order (fill "0" low, "9" high)."""
    text = _strip_tz(str(text).strip()).replace(":", "")
    whole, _, fraction = text.partition(".")
    if vr == "DA":
        return whole.ljust(8, fill)
    return whole.ljust(_WIDTH[vr], fill) + "." + fraction.ljust(6, fill)


def _match_temporal(query: str, stored: str, vr: str) -> bool:
    stored_n = _norm(stored, vr, "0")
    m = _RANGE.match(query.strip())
    if m:
        low, high = m.group(1), m.group(2)
        if low and stored_n < _norm(low, vr, "0"):
            return False
        return not (high and stored_n > _norm(high, vr, "9"))
    return stored_n == _norm(query, vr, "0")


def _wildcard(pattern: str) -> re.Pattern:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


def _match_value(query, stored, vr: str) -> bool:
    if vr in _WIDTH:
        return _match_temporal(str(query), str(stored), vr)
    if isinstance(query, str) and vr not in _NO_WILDCARD and ("*" in query or "?" in query):
        return bool(_wildcard(query).fullmatch(str(stored)))
    if isinstance(query, str):
        return query.strip() == str(stored).strip()
    return query == stored


def _is_universal(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return all(not _matching_keys(item) for item in elem.value or [])
    return elem.is_empty


def _matching_keys(ds: Dataset) -> list[DataElement]:
    return [e for e in ds if e.keyword not in NEVER_MATCHED and not _is_universal(e)]


def _match_element(query: DataElement, ds: Dataset) -> bool:
    if query.tag not in ds:
        return False
    stored = ds[query.tag]
    if query.VR == "SQ":
        return any(
            matches(q_item, s_item) for q_item in query.value for s_item in stored.value or []
        )
    if stored.is_empty:
        return False
    wanted = _values(query)
    return any(_match_value(q, s, query.VR) for q in wanted for s in _values(stored))


def matches(query: Dataset, ds: Dataset) -> bool:
    """True if ``ds`` matches every matching key of ``query`` (PS3.4 C.2.2.2)."""
    return all(_match_element(elem, ds) for elem in _matching_keys(query))


def _empty_element(elem: DataElement) -> DataElement:
    vr = elem.VR if elem.VR else dictionary_VR(elem.tag)
    return DataElement(elem.tag, vr, [] if vr == "SQ" else None)


def response_identifier(query: Dataset, ds: Dataset, sop_class_uid: str) -> Dataset:
    """Build the C-FIND response Identifier for ``ds`` (CC.2.8.3.1, C.2.2.2).

    It holds the requested keys only (zero length when the UPS has no value), never the
    Transaction UID (CC.2.7.3, Table CC.2.5-3), and always SOP Class UID = UPS Push (CC.3.1).
    """
    out = Dataset()
    for q in query:
        if q.keyword == "TransactionUID":
            continue
        if q.tag not in ds:
            out.add(_empty_element(q))
            continue
        stored = ds[q.tag]
        if q.VR == "SQ" and any(len(item) for item in q.value or []) and stored.value:
            keys = [e.tag for item in q.value for e in item]
            items = [
                s
                for s in stored.value
                if not any(_matching_keys(i) for i in q.value)
                or any(matches(i, s) for i in q.value)
            ]
            reduced = []
            for s in items:
                new = Dataset()
                for tag in keys:
                    if tag in s:
                        new.add(deepcopy(s[tag]))
                reduced.append(new)
            out.add(DataElement(q.tag, "SQ", Sequence(reduced)))
        else:
            out.add(deepcopy(stored))
    out.SOPClassUID = sop_class_uid
    return out


def tag_of(key: int | str) -> int:
    """A tag from a keyword or an int."""
    if isinstance(key, str):
        tag = tag_for_keyword(key)
        if tag is None:
            raise ValueError(f"unknown keyword {key!r}")
        return tag
    return int(key)
