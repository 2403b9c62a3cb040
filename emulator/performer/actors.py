"""Which UPS each kind of performing device takes, from the RO-17 step ranges in profiles/."""

from __future__ import annotations

from pydicom.dataset import Dataset

from emulator.profile import load_yaml

STEP_ORDER = ("acquisition", "registration", "adjustment", "delivery")
# The device kinds (each a composition of step classes: emulator/performer/kinds.py).
KINDS = ("pps", "tdd", "pds", "afterloader")


def step_names(kind: str) -> tuple[str, ...]:
    """The session steps a device kind takes, by the names of its step classes."""
    from emulator.performer.kinds import steps_of  # the steps import the results modules

    return tuple(step.name for step in steps_of(kind))


def step_of(ups: Dataset) -> str | None:
    """The session step a UPS's Scheduled Workitem code falls in, or None."""
    items = ups.get("ScheduledWorkitemCodeSequence") or []
    if not items or items[0].get("CodingSchemeDesignator") != "DCM":
        return None
    code = int(str(items[0].CodeValue))
    for step, bounds in load_yaml("workitems.yaml")["session_steps"].items():
        if int(bounds["first"]) <= code <= int(bounds["last"]):
            return step
    return None


def session_key(ups: Dataset) -> tuple[str, str]:
    """The session a UPS belongs to as a device sees it: the patient and the scheduled day."""
    return (
        str(ups.get("PatientID", "")),
        str(ups.get("ScheduledProcedureStepStartDateTime", ""))[:8],
    )


def session_label(ups: Dataset) -> str:
    """``session_key`` as one string: how outcomes name a session and the journal keys it."""
    return "/".join(session_key(ups))


def select(kind: str, worklist: list[Dataset]) -> list[tuple[str, Dataset]]:
    """The UPS this kind performs, session by session, each session in step order."""
    taken = step_names(kind)
    chosen = [(step_of(u), u) for u in worklist]
    chosen = [(s, u) for s, u in chosen if s in taken]
    return sorted(
        chosen,
        key=lambda su: (*session_key(su[1]), STEP_ORDER.index(su[0])),
    )
