"""UPS state-table decisions, read from ``profiles/ups.yaml``.

The table is data, so the code here only looks rows up: which status a request gets in the
current state, whether the Transaction UID is right, and whether the final-state
requirements are met. Nothing here touches the network or the database.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

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


def _has(ds: Dataset, path: str, allow_empty: bool = False) -> bool:
    """True if every item along a '>'-separated path holds the attribute (with a value)."""
    keyword, _, rest = path.partition(">")
    if keyword not in ds:
        return False
    element = ds[keyword]
    if rest:
        items = element.value or []
        return bool(items) and all(_has(item, rest, allow_empty) for item in items)
    if allow_empty:
        return True
    return element.value not in (None, "", [])


def missing_final_state(ds: Dataset, target: str) -> list[str]:
    """The final-state requirements for ``target`` ('completed'/'canceled') not yet met."""
    rule = ups_rules()["final_state_requirements"][target]
    missing = [p for p in rule.get("present", []) if not _has(ds, p)]
    missing += [p for p in rule.get("present_may_be_empty", []) if not _has(ds, p, True)]
    one_of = rule.get("one_of") or []
    if one_of and not any(_has(ds, p) for p in one_of):
        missing.append(" or ".join(one_of))
    return missing


def change_state(
    current_state: str,
    requested_state: str,
    sent_uid: str,
    recorded_uid: str,
    final_ready: Dataset | None = None,
) -> Decision:
    """One cell of PS3.4 Table CC.1.1-2 for an existing UPS.

    ``final_ready`` is the UPS as it would be after this request, for the final-state check.
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
            final_ready if final_ready is not None else Dataset(), requires
        )
        if missing:
            return Decision(
                table["not_final_state_ready"], comment=("missing " + ", ".join(missing))[:64]
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
    """Keywords an N-SET carries that it may never modify."""
    return [k for k in ups_rules()["n_set"]["forbidden"] if k in modifications]


def never_returned() -> set[str]:
    return set(ups_rules()["never_returned"])
