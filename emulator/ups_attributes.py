"""PS3.4 Table CC.2.5-3 (``profiles/ups_attributes.yaml``) and the questions asked of it.

The reference TMS asks which final-state requirements a UPS does not meet yet (C304 and
its Error Comment); the devices ask the same of the requests they are about to send, so a
final transition never fails on an attribute the device could have supplied; the
conformance suite checks its own requests with it before it blames a TMS. One table, read
here, answers all three, so none of them can drift into its own hand-picked subset.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from emulator.profile import load_yaml

FINAL_STATES = ("COMPLETED", "CANCELED")
# Which Final State Codes bind in which final state (CC.2.5.1.1).
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}
_CODES_FOR = {"COMPLETED": {"R", "RC", "P"}, "CANCELED": {"R", "RC", "X"}}


@dataclass(frozen=True)
class AttributeRow:
    """One row of Table CC.2.5-3; ``items`` are the rows of each item of a sequence."""

    keyword: str
    tag: str
    module: str
    n_create: str
    n_set: str
    final: str
    n_get: str
    match: str
    return_key: str
    condition: str = ""
    items: tuple[AttributeRow, ...] = ()

    @property
    def is_sequence(self) -> bool:
        return bool(self.items) or self.keyword.endswith("Sequence")

    @property
    def may_be_empty(self) -> bool:
        """A type 2 attribute is owed as present, not as valued (N-SET column, SCU side)."""
        return self.n_set.split("/")[0].startswith("2")


def _row(data: dict, module: str) -> AttributeRow:
    return AttributeRow(
        keyword=data["keyword"],
        tag=data["tag"],
        module=module,
        n_create=str(data["n_create"]),
        n_set=str(data["n_set"]),
        final=str(data["final"]),
        n_get=str(data["n_get"]),
        match=str(data["match"]),
        return_key=str(data["return"]),
        condition=str(data.get("condition", "")),
        items=tuple(_row(item, module) for item in data.get("items", [])),
    )


@functools.cache
def table() -> tuple[AttributeRow, ...]:
    """The top-level rows of Table CC.2.5-3, in the standard's module order."""
    data = load_yaml("ups_attributes.yaml")
    return tuple(_row(a, m["name"]) for m in data["modules"] for a in m["attributes"])


def reference() -> str:
    return str(load_yaml("ups_attributes.yaml")["reference"])


def walk(
    rows: tuple[AttributeRow, ...] | None = None, path: str = ""
) -> Iterator[tuple[str, AttributeRow]]:
    """Every row with its '>'-joined path, depth first."""
    for row in table() if rows is None else rows:
        here = f"{path}>{row.keyword}" if path else row.keyword
        yield here, row
        yield from walk(row.items, here)


def _non_default_text(ds: Dataset) -> bool:
    """True if any text value holds a character outside the default repertoire (ASCII)."""
    for element in ds:
        if element.VR == "SQ":
            if any(_non_default_text(item) for item in element.value or []):
                return True
        elif element.VR in _TEXT_VRS and element.value and not str(element.value).isascii():
            return True
    return False


def _condition_holds(condition: str, root: Dataset, holder: Dataset, row: AttributeRow) -> bool:
    if condition == "extended_character_set":
        return _non_default_text(root)
    if condition == "human_performer":
        return bool(holder.get(row.keyword))
    if condition == "in_item":
        return True
    raise ValueError(f"unknown Final State condition {condition!r} in ups_attributes.yaml")


def _owed(row: AttributeRow, state: str, root: Dataset, holder: Dataset) -> bool:
    if row.final not in _CODES_FOR[state]:
        return False
    return row.final != "RC" or _condition_holds(row.condition, root, holder, row)


def _missing_in(
    rows: tuple[AttributeRow, ...], state: str, root: Dataset, holder: Dataset, path: str
) -> list[str]:
    missing: list[str] = []
    for row in rows:
        here = f"{path}>{row.keyword}" if path else row.keyword
        element = holder[row.keyword] if row.keyword in holder else None  # noqa: SIM401
        owed = _owed(row, state, root, holder)
        if element is None:
            if owed:
                missing.append(here)
            continue
        value = element.value
        if not row.is_sequence:
            if owed and value in (None, "", b"", []):
                missing.append(here)
            continue
        items = list(value or [])
        if not items:
            owes_items = any(_owed(item, state, root, Dataset()) for item in row.items)
            if owed and (owes_items or not row.may_be_empty):
                missing.append(here)
            continue
        for item in items:
            missing += _missing_in(row.items, state, root, item, here)
    return list(dict.fromkeys(missing))


def missing_for_final_state(ups: Dataset, state: str) -> list[str]:
    """Paths ('A>B') of the attributes ``ups`` lacks before it may become ``state``.

    ``state`` is COMPLETED or CANCELED; the codes that bind (R, RC, P, X) come from the
    table, RC rows only where their condition holds.
    """
    if state not in FINAL_STATES:
        raise ValueError(f"{state!r} is not a final state")
    return _missing_in(table(), state, ups, ups, "")


def performer_missing(requests: list[Dataset], state: str) -> list[str]:
    """What a performer's own N-SETs before ``state`` leave out of what it owes.

    The performer owes the P (COMPLETED) and X (CANCELED) rows, and what RC rows inside
    them require; R rows are the scheduler's. The requests are merged in order, as the SCP
    applies them, and judged alone, so a device or the conformance suite can find its own
    mistake before it blames a TMS for refusing.
    """
    merged = Dataset()
    for request in requests:
        for element in request:
            merged[element.tag] = element
    return [
        path
        for path in missing_for_final_state(merged, state)
        if final_code(path.split(">", 1)[0]) in ("P", "X")
    ]


def final_state_comment(missing: list[str], limit: int = 64) -> str:
    """An Error Comment (LO, 64 characters) naming what is missing: what the performer owes
    (P, X) first, since that is what a performer can still supply."""
    owed = sorted(missing, key=lambda p: final_code(p.split(">", 1)[0]) not in ("P", "X"))
    names = list(dict.fromkeys(path.rsplit(">", 1)[-1] for path in owed))
    text = "missing " + ", ".join(names)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def final_code(keyword: str) -> str:
    """The Final State Code of a top-level attribute ("" if the table has no such row)."""
    return next((row.final for row in table() if row.keyword == keyword), "")


@dataclass(frozen=True)
class CreateProblem:
    """Why an N-CREATE attribute list is refused: the DIMSE status and the attribute."""

    status: int
    comment: str


def n_create_problems(attributes: Dataset) -> list[CreateProblem]:
    """What the N-CREATE column of Table CC.2.5-3 says is wrong with an attribute list.

    SCU type 1 must be present with a value (0120 missing attribute, 0121 missing value),
    type 2 present (0120); "Not allowed" must be absent (0105 no such attribute); the state
    must be SCHEDULED (C309) and the Transaction UID zero length (0106). Conditional types
    are the scheduler's own judgement and not refused here.
    """
    problems = []
    for row in table():
        scu = row.n_create.split("/")[0].strip().lower()
        present = row.keyword in attributes
        value = attributes[row.keyword].value if present else None
        empty = value in (None, "", b"", [])
        if scu == "not allowed" and present:
            problems.append(CreateProblem(0x0105, f"{row.keyword} is not allowed in N-CREATE"))
        elif scu in ("1", "2") and not present:
            problems.append(CreateProblem(0x0120, f"{row.keyword} is missing"))
        elif scu == "1" and empty:
            problems.append(CreateProblem(0x0121, f"{row.keyword} has no value"))
    state = str(attributes.get("ProcedureStepState", "") or "")
    if state and state != "SCHEDULED":
        problems.insert(0, CreateProblem(0xC309, "Procedure Step State must be SCHEDULED"))
    if str(attributes.get("TransactionUID", "") or ""):
        problems.append(CreateProblem(0x0106, "Transaction UID must be zero length"))
    return problems


def never_returned() -> set[str]:
    """Attributes whose N-GET type is Not allowed: the SCP never returns them (CC.2.7.3)."""
    return {row.keyword for _, row in walk() if row.n_get.lower() == "not allowed"}


def n_get_owed() -> set[str]:
    """Top-level attributes an N-GET response owes when asked for (CC.2.7.3): N-GET return
    type 1 on the SCP side, of an attribute every UPS holds from its creation (N-CREATE SCP
    type 1 or 2). Others may be absent from a UPS, and the SCU must cope (CC.2.7.2)."""
    owed = set()
    for row in table():
        scp_get = row.n_get.split("/")[-1].strip()
        scp_create = row.n_create.split("/")[-1].strip()
        if scp_get == "1" and scp_create in ("1", "2"):
            owed.add(row.keyword)
    return owed


def n_set_not_allowed() -> set[str]:
    """Top-level attributes an N-SET may not carry (identity, state, patient)."""
    return {row.keyword for row in table() if row.n_set.lower() == "not allowed"}


# -- CID 9300: why a UPS ended CANCELED ---------------------------------------------------


@dataclass(frozen=True)
class DiscontinuationReason:
    cause: str
    value: str
    scheme: str
    meaning: str

    def as_item(self) -> Dataset:
        item = Dataset()
        item.CodeValue = self.value
        item.CodingSchemeDesignator = self.scheme
        item.CodeMeaning = self.meaning
        return item


@functools.cache
def discontinuation_reason(cause: str) -> DiscontinuationReason:
    """The CID 9300 code ``profiles/discontinuation_reasons.yaml`` gives ``cause``.

    The code is taken from pydicom's copy of PS3.16 by the keyword the table names, so a
    code that is not in CID 9300 fails here rather than reaching a TMS.
    """
    data = load_yaml("discontinuation_reasons.yaml")
    entry = data["causes"].get(cause)
    if entry is None:
        raise ValueError(f"no discontinuation reason for cause {cause!r}")
    code = getattr(codes.cid9300, entry["keyword"])
    if (code.value, code.meaning) != (str(entry["code"]), entry["meaning"]):
        raise ValueError(f"{cause}: {entry['keyword']} is {code.value} {code.meaning!r} in PS3.16")
    return DiscontinuationReason(cause, code.value, code.scheme_designator, code.meaning)


def discontinuation_causes() -> list[str]:
    return list(load_yaml("discontinuation_reasons.yaml")["causes"])


def cancellation_item(percent: float, reason: str, cause: str) -> Dataset:
    """The Procedure Step Progress Information item a CANCELED UPS needs (Final State X):
    the progress reached, when, why in words, and why as a CID 9300 code for ``cause``."""
    item = Dataset()
    item.ProcedureStepProgress = round(min(max(percent, 0.0), 100.0), 2)
    item.ProcedureStepCancellationDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    item.ReasonForCancellation = reason[:10240]
    item.ProcedureStepDiscontinuationReasonCodeSequence = Sequence(
        [discontinuation_reason(cause).as_item()]
    )
    return item
