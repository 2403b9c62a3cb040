"""Teaches pynetdicom the seed's draft UIDs, so the trial UID set works end to end.

pynetdicom knows the final UPS and RT Beams Delivery Instruction classes; the draft ones
(Supplements 74 and 96) need a service class before any AE can accept or send them.
"""

from __future__ import annotations

from pynetdicom import register_uid
from pynetdicom.sop_class import StorageServiceClass, UnifiedProcedureStepServiceClass

from emulator.profile import SopClasses

_REGISTERED: set[str] = set()
_UPS_CLASSES = ("ups_push", "ups_pull", "ups_watch", "ups_event")
_STORAGE_CLASSES = ("rt_beams_delivery_instruction",)


def register_uid_set(uids: SopClasses) -> None:
    """Registers the trial UIDs once per process; the final set needs nothing."""
    if uids.uid_set == "final":
        return
    for name in (*_UPS_CLASSES, *_STORAGE_CLASSES):
        uid = uids.uids.get(name)
        if not uid or uid in _REGISTERED:
            continue
        keyword = "Trial" + "".join(part.capitalize() for part in name.split("_"))
        service = UnifiedProcedureStepServiceClass if name in _UPS_CLASSES else StorageServiceClass
        register_uid(uid, keyword, service)
        _REGISTERED.add(uid)
