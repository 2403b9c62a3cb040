"""Rejecting an association from EVT_REQUESTED, before pynetdicom negotiates it.

pynetdicom checks a calling AE title against an exact list and the called AE title against
its own; a fleet needs more: a receiver shared by many AE titles, and peers given as a
pattern (``W01*@host:port``, every device of one soak machine). Those checks run in the
EVT_REQUESTED handler, which pynetdicom documents as the place to reject, and end the
association exactly as pynetdicom's own negotiation does (acse.py): A-ASSOCIATE-RJ,
EVT_REJECTED, kill.
"""

from __future__ import annotations

import fnmatch

from pynetdicom import evt

# A-ASSOCIATE-RJ result, source, diagnostic: rejected permanent, by the service user
# (PS3.8 Table 9-21).
CALLING_NOT_RECOGNISED = (0x01, 0x01, 0x03)
CALLED_NOT_RECOGNISED = (0x01, 0x01, 0x07)


def matches(ae_title: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(ae_title, p) for p in patterns)


def reject(assoc, reason: tuple[int, int, int]) -> None:
    assoc.acse.send_reject(*reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def calling_pattern_check(allowed: tuple[str, ...]):
    """An EVT_REQUESTED handler accepting callers whose title matches one of ``allowed``."""

    def check(event: evt.Event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        if not matches(calling, allowed):
            reject(event.assoc, CALLING_NOT_RECOGNISED)

    return (evt.EVT_REQUESTED, check)
