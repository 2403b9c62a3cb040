"""UPS state-table decisions, read from ``profiles/ups.yaml``.

The table is data, so the code here only looks rows up: which status a request gets in the
current state, whether the Transaction UID is right, and whether the final-state
requirements of PS3.4 Table CC.2.5-3 (``profiles/ups_attributes.yaml``) are met. Nothing
here touches the network or the database.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from emulator import ups_attributes
from emulator.profile import load_yaml


@functools.cache
def ups_rules() -> dict[str, Any]:
    return load_yaml("ups.yaml")


@dataclass(frozen=True)
class Decision:
    """What to answer, and what to change if the answer is a success."""

    status: int
    to_state: str | None = None
    record_uid: bool = False
    cancel_requested: bool = False
    comment: str = ""


def missing_final_state(
    ds: Dataset, target: str, judged: Callable[[str], bool] | None = None
) -> list[str]:
    """The Final State requirements (PS3.4 Table CC.2.5-3) ``ds`` does not meet for the
    final state ``target`` (COMPLETED or CANCELED), as '>'-joined attribute paths.

    ``judged`` narrows the answer to the paths an observer can know about (the conformance
    suite sees only the attributes that crossed the wire).
    """
    missing = ups_attributes.missing_for_final_state(ds, target)
    return [path for path in missing if judged is None or judged(path)]


def with_change_state_extras(ups: Dataset, info: Dataset, requested_state: str) -> Dataset:
    """The UPS as a Change State request leaves it before the final-state check.

    PS3.4 CC.2.1.2 gives the request only the state and the Transaction UID, so nothing in
    it can meet a final-state requirement. The seed (RO-18 3.18.4.1) adds the Reason For
    Cancellation to a CANCELED request: it is kept in the progress item, where the UPS IOD
    holds it, and only if the performer's N-SET did not give one.
    """
    after = deepcopy(ups)
    reason = str(info.get("ReasonForCancellation", "") or "")
    items = after.get("ProcedureStepProgressInformationSequence") or []
    if (
        requested_state == "CANCELED"
        and reason
        and items
        and not items[0].get("ReasonForCancellation")
    ):
        items[0].ReasonForCancellation = reason[:10240]
    return after


def change_state(
    current_state: str,
    requested_state: str,
    sent_uid: str,
    recorded_uid: str,
    final_ready: Dataset | None = None,
    judged: Callable[[str], bool] | None = None,
) -> Decision:
    """One cell of PS3.4 Table CC.1.1-2 for an existing UPS.

    ``final_ready`` is the UPS as it would be after this request, for the final-state check;
    ``judged`` as in :func:`missing_final_state`.
    """
    table = ups_rules()["change_state"]
    if requested_state not in ups_rules()["states"]:
        return Decision(0x0106, comment=f"unknown Procedure Step State {requested_state!r}")
    row = table[requested_state]
    if row["uid"] == "required":
        # A SCHEDULED UPS has no recorded UID yet: there, "right" means "one was sent".
        uid_ok = bool(sent_uid) and (current_state == "SCHEDULED" or sent_uid == recorded_uid)
        if not uid_ok:
            return Decision(table["wrong_uid"], comment="wrong or missing Transaction UID")
    cell = row[current_state]
    status = int(cell["status"])
    requires = cell.get("requires")
    if status == 0 and requires:
        missing = missing_final_state(
            final_ready if final_ready is not None else Dataset(), requested_state, judged
        )
        if missing:
            return Decision(
                table["not_final_state_ready"],
                comment=ups_attributes.final_state_comment(missing),
            )
    return Decision(status, cell.get("to"), bool(cell.get("record_uid")))


def request_cancel(current_state: str) -> Decision:
    cell = ups_rules()["request_cancel"][current_state]
    return Decision(
        int(cell["status"]), cell.get("to"), cancel_requested=bool(cell.get("cancel_requested"))
    )


def n_set_status(current_state: str, sent_uid: str, recorded_uid: str) -> int:
    """0 when an N-SET may modify the UPS, else the failure status."""
    rules = ups_rules()["n_set"]
    if current_state in rules["by_state"]:
        return int(rules["by_state"][current_state])
    if not sent_uid or sent_uid != recorded_uid:
        return int(rules["wrong_uid"])
    return 0


def n_set_forbidden(modifications: Dataset) -> list[str]:
    """Keywords an N-SET carries that it may never modify: the N-SET type "Not allowed"
    of Table CC.2.5-3 (state, identity, patient)."""
    return sorted(k for k in ups_attributes.n_set_not_allowed() if k in modifications)


def meaning(status: int) -> str:
    """PS3.4's "Further Meaning" of a UPS failure status ("" for others)."""
    return str(ups_rules().get("status_meanings", {}).get(int(status), ""))


def never_returned() -> set[str]:
    """What N-GET and C-FIND never return (the table's N-GET type "Not allowed")."""
    return ups_attributes.never_returned()
