"""UIDs and identifiers of the Unified Procedure Step service (PS3.4 Annex CC, PS3.6).

Two UID sets exist:

* ``final``: PS3.4 CC.3.1 "Service Class and SOP Class UIDs" (1.2.840.10008.5.1.4.34.6.x).
* ``trial``: the frozen draft of Supplement 96 (1.2.840.10008.5.1.4.34.4.x), which PS3.6 still
  lists as retired "... SOP Class - Trial" UIDs and which the IHE-RO 2008 profile points at.

The well-known subscription instances (CC.2.3.2) are the same for both sets; the frozen draft
text could not be consulted, so this is an assumption.

pynetdicom 3.0.4 routes a request to a service class by the SOP Class UID in the *message*
(``Association._serve_request``) and only knows the final UPS UIDs; :func:`ensure_registered`
registers the trial UIDs with pynetdicom's UPS service class so that a trial peer works.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pynetdicom.service_class import StorageServiceClass
from pynetdicom.service_class_n import UnifiedProcedureStepServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
"""UPS Global Subscription SOP Instance (PS3.4 CC.2.3.2)."""
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"
"""UPS Filtered Global Subscription SOP Instance (PS3.4 CC.2.3.2, CC.2.3.3.1)."""
WELL_KNOWN_INSTANCES = frozenset({GLOBAL_SUBSCRIPTION, FILTERED_GLOBAL_SUBSCRIPTION})

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"

SCHEDULED = "SCHEDULED"
IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
CANCELED = "CANCELED"
STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED)
FINAL_STATES = frozenset({COMPLETED, CANCELED})


class ActionType(IntEnum):
    """N-ACTION Action Type IDs (Tables CC.2.1-1, CC.2.2-1, CC.2.3-1)."""

    CHANGE_STATE = 1
    REQUEST_CANCEL = 2
    SUBSCRIBE = 3
    UNSUBSCRIBE = 4
    SUSPEND_GLOBAL = 5


class EventType(IntEnum):
    """N-EVENT-REPORT Event Type IDs (Table CC.2.4-1)."""

    STATE_REPORT = 1
    CANCEL_REQUESTED = 2
    PROGRESS_REPORT = 3
    SCP_STATUS_CHANGE = 4
    ASSIGNED = 5


@dataclass(frozen=True)
class UidSet:
    """The UPS SOP Class UIDs of one edition."""

    name: str
    push: str
    watch: str
    pull: str
    event: str
    query: str | None
    rt_beams_delivery_instruction: str

    @property
    def all_ups(self) -> tuple[str, ...]:
        return tuple(u for u in (self.push, self.watch, self.pull, self.event, self.query) if u)

    def label(self, uid: str) -> str:
        """A short name for a UPS SOP Class UID of this set ("push", "pull", ...)."""
        for name in ("push", "watch", "pull", "event", "query"):
            if getattr(self, name) == uid:
                return name
        return uid


FINAL = UidSet(
    name="final",
    push="1.2.840.10008.5.1.4.34.6.1",
    watch="1.2.840.10008.5.1.4.34.6.2",
    pull="1.2.840.10008.5.1.4.34.6.3",
    event="1.2.840.10008.5.1.4.34.6.4",
    query="1.2.840.10008.5.1.4.34.6.5",
    rt_beams_delivery_instruction="1.2.840.10008.5.1.4.34.7",
)
TRIAL = UidSet(
    name="trial",
    push="1.2.840.10008.5.1.4.34.4.1",
    watch="1.2.840.10008.5.1.4.34.4.2",
    pull="1.2.840.10008.5.1.4.34.4.3",
    event="1.2.840.10008.5.1.4.34.4.4",
    query=None,
    rt_beams_delivery_instruction="1.2.840.10008.5.1.4.34.1",
)
_SETS = {"final": FINAL, "trial": TRIAL}


def uid_set(name: str | UidSet) -> UidSet:
    """Return the UID set called ``name`` ("final" or "trial") and make pynetdicom know it."""
    if isinstance(name, UidSet):
        result = name
    else:
        try:
            result = _SETS[name]
        except KeyError:
            raise ValueError(f"uid_set must be 'final' or 'trial', not {name!r}") from None
    ensure_registered(result)
    return result


def ensure_registered(uids: UidSet) -> None:
    """Register the UIDs of ``uids`` with pynetdicom if it does not know them (idempotent)."""
    for name in ("push", "watch", "pull", "event"):
        uid = getattr(uids, name)
        if uid_to_service_class(uid) is not UnifiedProcedureStepServiceClass:
            keyword = f"PeerUnifiedProcedureStep{name.capitalize()}{uids.name.capitalize()}"
            register_uid(uid, keyword, UnifiedProcedureStepServiceClass)
    bdi = uids.rt_beams_delivery_instruction
    if uid_to_service_class(bdi) is not StorageServiceClass:
        register_uid(
            bdi, f"PeerRTBeamsDeliveryInstruction{uids.name.capitalize()}", StorageServiceClass
        )
