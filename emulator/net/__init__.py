"""DICOM plumbing shared by every actor: AE factory, peers, and SCU helpers."""

from emulator.net import (
    dimse_queue_guard,
    reactor_wakeup,
    socket_ready_guard,
    trial_ups_contexts,
)

# Every actor imports this package before it opens an association.
dimse_queue_guard.install()
socket_ready_guard.install()
reactor_wakeup.install()
trial_ups_contexts.install()
