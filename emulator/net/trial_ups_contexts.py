"""Lets a UPS Push request travel on a trial UPS context, as pynetdicom lets a final one.

PS3.4 CC.2.4: an N-EVENT-REPORT names the UPS Push SOP Class as its Affected SOP Class and
travels on the UPS Event presentation context (Push is the class of every UPS instance; the
Event class exists to negotiate the notification). pynetdicom 1.5.2 and later find that
context for the final UIDs (their issue #509), but not for the
draft Supplement 96 "Trial" UIDs the seed uses (``--uids trial``): there,
``send_n_event_report`` fails with "No presentation context for 'Unified Procedure Step -
Push SOP Class - Trial'", and a TMS in trial mode could never send an event.

The guard adds the same fallback for the trial UIDs and nothing else: only when pynetdicom
found no context for the trial Push class does it look for an accepted trial Pull, Watch or
Event context. Every other lookup is pynetdicom's own.
"""

from __future__ import annotations

from pynetdicom.association import Association

from emulator.profile import load_sop_classes

_TRIAL = load_sop_classes("trial")
TRIAL_PUSH = _TRIAL["ups_push"]
# UPS Event first: it is the context an N-EVENT-REPORT travels on.
TRIAL_OTHERS = (_TRIAL["ups_event"], _TRIAL["ups_pull"], _TRIAL["ups_watch"])

_original_get_valid_context = Association._get_valid_context


def _get_valid_context(self: Association, ab_syntax, tr_syntax, *args, **kwargs):
    try:
        return _original_get_valid_context(self, ab_syntax, tr_syntax, *args, **kwargs)
    except ValueError:
        if str(ab_syntax) != TRIAL_PUSH:
            raise
        for other in TRIAL_OTHERS:
            try:
                return _original_get_valid_context(self, other, tr_syntax, *args, **kwargs)
            except ValueError:
                continue
        raise


def install() -> None:
    """Route pynetdicom's context lookup through the trial fallback (idempotent)."""
    Association._get_valid_context = _get_valid_context


def installed() -> bool:
    return Association._get_valid_context is _get_valid_context
