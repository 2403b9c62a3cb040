"""DICOM plumbing shared by every actor: AE factory, peers, and SCU helpers."""

from emulator.net import (
    dimse_queue_guard,
    patch_guard,
    reactor_wakeup,
    socket_ready_guard,
    trial_ups_contexts,
)

# Every actor imports this package before it opens an association; the patches go in only
# on the pynetdicom they were verified on (patch_guard), all or none.
PATCHED = patch_guard.install_all(
    [
        dimse_queue_guard.install,
        socket_ready_guard.install,
        reactor_wakeup.install,
        trial_ups_contexts.install,
    ]
)
