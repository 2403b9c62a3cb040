"""The trial-UID fallback: an N-EVENT-REPORT for a trial UPS reaches its subscriber.

Without emulator/net/trial_ups_contexts.py, pynetdicom cannot send a UPS Push - Trial
N-EVENT-REPORT over the UPS Event - Trial context (it maps Push to the other UPS classes
for the final UIDs only), so a reference TMS started with --uids trial sends no event.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from emulator.net import trial_ups_contexts
from emulator.net.event_scp import EventReceiver
from emulator.net.uid_registry import register_uid_set
from emulator.profile import load_sop_classes
from tests.conftest import wait_until


def _state_report() -> Dataset:
    ds = Dataset()
    ds.ProcedureStepState = "IN PROGRESS"
    ds.InputReadinessState = "READY"
    return ds


@pytest.mark.parametrize("guarded", [True, False])
def test_a_trial_ups_event_reaches_its_subscriber_only_with_the_guard(guarded, monkeypatch):
    trial = load_sop_classes("trial")
    register_uid_set(trial)  # as every device, TMS and Archive of the product does
    assert trial_ups_contexts.installed()
    if not guarded:
        monkeypatch.setattr(
            Association, "_get_valid_context", trial_ups_contexts._original_get_valid_context
        )
    received = []
    receiver = EventReceiver("DEVICE", trial["ups_event"], received.append, ["TMS"])
    host, port = receiver.start()
    try:
        ae = AE(ae_title="TMS")
        ae.add_requested_context(trial["ups_event"])
        assoc = ae.associate(host, port, ae_title="DEVICE")
        assert assoc.is_established
        ups = str(generate_uid())
        try:
            if not guarded:
                with pytest.raises(ValueError, match="Push SOP Class - Trial"):
                    assoc.send_n_event_report(_state_report(), 1, trial["ups_push"], ups)
                return
            status, _ = assoc.send_n_event_report(_state_report(), 1, trial["ups_push"], ups)
        finally:
            assoc.release()
        assert status.Status == 0x0000
        wait_until(lambda: received, 5, "the event reaching the subscriber")
        (notice,) = received
        assert (notice.event_type, notice.ups_uid) == (1, ups)
        assert notice.info.ProcedureStepState == "IN PROGRESS"
    finally:
        receiver.stop()
