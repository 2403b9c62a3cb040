"""The UPS Event sending side of the peer TMS (PS3.4 CC.2.4.3), and Table CC.2.4-1 builders.

Events are queued by the SCP's handlers and sent by one background thread, in order, each on
its own association to the Receiving AE's address from the ``{ae_title: (host, port)}`` map.
The presentation context is UPS Event; the Affected SOP Class UID is UPS Push, "since all UPSs
are created as instances of the UPS Push SOP Class" (CC.2.4.3, CC.3.1). ``legacy=True`` puts
the UPS Event class there instead, to see how a receiver copes.

tdwii_plus_examples ``nevent_sender.py`` sends State Reports the same way
(``send_n_event_report(info, 1, UnifiedProcedureStepPush, uid)``).
"""

from __future__ import annotations

import queue
import threading
import time
from copy import deepcopy
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE

from .ups_uids import CANCELED, UidSet


@dataclass(frozen=True)
class SentEvent:
    receiving_ae: str
    event_type_id: int
    sop_class_uid: str
    instance_uid: str
    event_information: Dataset
    status: int  # the receiver's N-EVENT-REPORT status; FFFFH if it could not be reached
    time: float


class EventSender:
    """A queue of N-EVENT-REPORTs and the thread that sends them."""

    def __init__(
        self,
        ae_title: str,
        uids: UidSet,
        destinations: dict[str, tuple[str, int]],
        legacy: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.ae_title, self.uids, self.destinations = ae_title, uids, destinations
        self.legacy, self.timeout = legacy, timeout
        self.sent: list[SentEvent] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ups-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=self.timeout * 2)
            self._thread = None

    def put(self, receiving_ae: str, event_type: int, uid: str, info: Dataset) -> None:
        self._queue.put((receiving_ae, int(event_type), uid, deepcopy(info)))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is queued or being sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _loop(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(self.uids.event)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._send(ae, *item)
            finally:
                self._queue.task_done()

    def _send(self, ae: AE, receiving_ae: str, kind: int, uid: str, info: Dataset) -> None:
        sop_class = self.uids.event if self.legacy else self.uids.push
        status = 0xFFFF
        address = self.destinations.get(receiving_ae)
        if address is not None:
            assoc = ae.associate(address[0], address[1], ae_title=receiving_ae)
            if assoc.is_established:
                try:
                    rsp, _ = assoc.send_n_event_report(
                        info, kind, sop_class, uid, meta_uid=self.uids.event
                    )
                    if rsp is not None and "Status" in rsp:
                        status = int(rsp.Status)
                finally:
                    assoc.release()
        with self._lock:
            self.sent.append(
                SentEvent(receiving_ae, kind, sop_class, uid, info, status, time.monotonic())
            )


# ------------------------------------------------------------------ Table CC.2.4-1
def state_report_info(ups: Dataset) -> Dataset:
    """UPS State Report (Event Type 1): state, readiness, and the cancel reason if CANCELED."""
    info = Dataset()
    info.ProcedureStepState = ups.ProcedureStepState
    info.InputReadinessState = ups.get("InputReadinessState", "")
    if ups.ProcedureStepState == CANCELED:
        seq = ups.get("ProcedureStepProgressInformationSequence")
        item = seq[0] if seq else Dataset()
        if item.get("ReasonForCancellation"):
            info.ReasonForCancellation = item.ReasonForCancellation
        if item.get("ProcedureStepDiscontinuationReasonCodeSequence"):
            info.ProcedureStepDiscontinuationReasonCodeSequence = deepcopy(
                item.ProcedureStepDiscontinuationReasonCodeSequence
            )
    return info


_CANCEL_REQUEST_KEYS = (
    "ReasonForCancellation",
    "ProcedureStepDiscontinuationReasonCodeSequence",
    "ContactURI",
    "ContactDisplayName",
)


def cancel_requested_info(requesting_ae: str, action_information: Dataset) -> Dataset:
    """UPS Cancel Requested (Event Type 2): Requesting AE, plus what the N-ACTION gave (1C)."""
    info = Dataset()
    info.RequestingAE = requesting_ae
    for keyword in _CANCEL_REQUEST_KEYS:
        if keyword in action_information:
            info[keyword] = deepcopy(action_information[keyword])
    return info


def progress_report_info(ups: Dataset) -> Dataset:
    """UPS Progress Report (Event Type 3): the Procedure Step Progress Information Sequence."""
    info = Dataset()
    info.ProcedureStepProgressInformationSequence = deepcopy(
        ups.get("ProcedureStepProgressInformationSequence", [])
    )
    return info


def scp_status_info(scp_status: str, subscription_list_status: str | None = None) -> Dataset:
    """SCP Status Change (Event Type 4)."""
    info = Dataset()
    info.SCPStatus = scp_status
    if subscription_list_status:
        info.SubscriptionListStatus = subscription_list_status
    return info


def assigned_info(ups: Dataset) -> Dataset | None:
    """UPS Assigned (Event Type 5, CC.2.4.3): the current station and/or human performers.

    None when neither Scheduled Station Name Code Sequence nor Scheduled Human Performers
    Sequence is populated, in which case CC.2.4.3 asks for no UPS Assigned event.
    """
    station = ups.get("ScheduledStationNameCodeSequence")
    performers = ups.get("ScheduledHumanPerformersSequence")
    if not station and not performers:
        return None
    info = Dataset()
    if station:
        info.ScheduledStationNameCodeSequence = deepcopy(station)
    if performers:
        info.ScheduledHumanPerformersSequence = deepcopy(performers)
    info.InputReadinessState = ups.get("InputReadinessState", "")
    return info
