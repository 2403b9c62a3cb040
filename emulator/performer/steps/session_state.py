"""What a session's later steps build on: the planning CT, the CBCT, the correction found.

Journaled as SOP Instance UIDs in the device's store after each step, so a process
restarted between two steps of a session carries on with them instead of registering
nothing or moving the couch by nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from devices.base import CouchCorrection
from emulator.store import ObjectStore


@dataclass
class SessionState:
    planning_ct: list[Dataset] = field(default_factory=list)
    cbct: list[Dataset] = field(default_factory=list)
    correction: CouchCorrection | None = None  # what the registration measured

    def journal_state(self) -> dict:
        """UIDs and numbers only: the images themselves are in the device's store."""
        correction = self.correction
        return {
            "planning_ct": [str(ds.SOPInstanceUID) for ds in self.planning_ct],
            "cbct": [str(ds.SOPInstanceUID) for ds in self.cbct],
            "correction": (
                [list(correction.translation), list(correction.rotation)] if correction else None
            ),
        }

    @classmethod
    def from_journal(cls, state: dict, store: ObjectStore) -> SessionState:
        """The session as journaled; an image no longer in the store leaves its list empty,
        so the step that needs it cancels rather than working on part of a series."""

        def images(uids: list[str]) -> list[Dataset]:
            found = [store.get(uid) for uid in uids]
            return [store.read(i) for i in found] if all(found) else []

        correction = state.get("correction")
        return cls(
            images(state.get("planning_ct", [])),
            images(state.get("cbct", [])),
            CouchCorrection(tuple(correction[0]), tuple(correction[1])) if correction else None,
        )


def patient_position(planning_ct: list[Dataset]) -> str:
    """How the patient lies (DICOM Patient Position, HFS when the CT does not say): which
    table-top axis is which patient axis."""
    return str((planning_ct[0].get("PatientPosition") if planning_ct else "") or "HFS")
