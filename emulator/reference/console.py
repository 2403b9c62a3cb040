"""The reference TMS's operator console, as DICOM: what a therapist does from the TMS side.

``tdw-emu tms cancel UID --reason ...`` sends the N-ACTION Request Cancel (PS3.4 CC.2.2) a
TMS front end sends when a therapist stops a treatment; the TMS then tells the performer
(UPS Cancel Requested) and the device holds its beam. ``tdw-emu tms list`` shows the UPS
and their states, by a UPS C-FIND for every state.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from emulator import ups_attributes
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.ups_scu import UpsConnection
from emulator.performer.workflow import worklist_identifier
from emulator.profile import Profile


def request_cancel(
    tms: Peer,
    calling_ae: str,
    uid: str,
    reason: str,
    profile: Profile,
    settings: NetworkSettings | None = None,
) -> tuple[int, str]:
    """N-ACTION Request Cancel with the reason and a proposed CID 9300 code; returns the
    status and the TMS's Error Comment."""
    info = Dataset()
    info.ReasonForCancellation = reason[:1024]
    info.ProcedureStepDiscontinuationReasonCodeSequence = Sequence(
        [ups_attributes.discontinuation_reason("tms_request").as_item()]
    )
    info.ContactDisplayName = calling_ae
    with UpsConnection(calling_ae, tms, profile, settings) as connection:
        reply = connection.request_cancel(uid, info)
    return reply.status, reply.comment


def list_ups(
    tms: Peer,
    calling_ae: str,
    profile: Profile,
    station: str = "",
    settings: NetworkSettings | None = None,
) -> list[Dataset]:
    """Every UPS of today (at ``station``, if given), in any state."""
    query = worklist_identifier(station)
    query.ProcedureStepState = ""
    if not station:
        query.ScheduledStationNameCodeSequence = Sequence([])
    with UpsConnection(calling_ae, tms, profile, settings) as connection:
        return connection.find(query)
