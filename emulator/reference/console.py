"""The reference TMS's operator console, as DICOM: what a therapist does from the TMS side.

``tdw-emu tms cancel UID --reason ...`` sends the N-ACTION Request Cancel (PS3.4 CC.2.2) a
TMS front end sends when a therapist stops a treatment; the TMS then tells the performer
(UPS Cancel Requested) and the device holds its beam. With ``--force`` the operator says the
performer is gone (a killed process, a dead console) and the reference TMS ends the IN
PROGRESS UPS itself, as PS3.4 CC.2.1.3 lets an SCP that "has determined that the
performing SCU has been disabled". ``tdw-emu tms list`` shows the UPS
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
from emulator.reference import ups_rules
from emulator.synth.common import code_item


def request_cancel(
    tms: Peer,
    calling_ae: str,
    uid: str,
    reason: str,
    profile: Profile,
    settings: NetworkSettings | None = None,
    force: bool = False,
) -> tuple[int, str]:
    """N-ACTION Request Cancel with the reason and a proposed CID 9300 code; returns the
    status and the TMS's Error Comment. ``force``: the operator has determined that the
    performer is gone, and the reference TMS ends the UPS itself (PS3.4 CC.2.1.3)."""
    info = Dataset()
    info.ReasonForCancellation = reason[:1024]
    proposed = ups_attributes.discontinuation_reason("tms_request").as_item()
    if force:
        forced = ups_rules.ups_rules()["request_cancel"]["operator_forced"]
        proposed = code_item(forced["code"], forced["scheme"], forced["meaning"])
    info.ProcedureStepDiscontinuationReasonCodeSequence = Sequence([proposed])
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
