"""The datasets of each message a performing device sends (RO-17 query, RO-26 progress,
RO-21 final update, RO-25 cancel), shared by the workflow and the scenario runner, and
the one sentence a refused claim is told in."""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from emulator import ups_attributes
from emulator.net.ups_scu import Reply
from emulator.profile import Profile
from emulator.synth.common import code_item
from emulator.ups_references import InstanceReference, reference_item

STATION_SCHEME = "99TDWEMU"


def _dt(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def claim_refusal(reply: Reply, sent_transaction_uid: str) -> str:
    """Why a claim was refused, in one sentence: the status, the TMS's Error Comment, and
    what a zero-length Transaction UID means to a final-standard TMS."""
    text = f"claim refused (0x{reply.status:04X}" + (
        f": {reply.comment})" if reply.comment else ")"
    )
    if reply.status == 0xC301 and not sent_transaction_uid:
        text += (
            ": this device sent a zero-length Transaction UID, as RO-19 2008 has the TMS "
            "make it, and this TMS wants it from the performer (PS3.4 CC.2.1.2); "
            "--profile tdw-ii makes the final standard's claim"
        )
    return text


# -- the datasets of each message, shared with the scenario runner ----------------------------


def worklist_identifier(
    station: str, day: dt.date | None = None, now: dt.datetime | None = None
) -> Dataset:
    """RO-17: every required matching and return key of Table 3.17-1 (Notes 1, 5, 6, 7).

    The date range (Note 5, "such as the rest of the current day"): ``day``'s, or today's
    reaching back at least an hour, so a session scheduled just before midnight is still
    found just after it."""
    now = now or dt.datetime.now()
    first = dt.datetime.combine(day or now.date(), dt.time(0, 0))
    if day is None:
        first = min(first, now - dt.timedelta(hours=1))
    day = day or now.date()
    ident = Dataset()
    ident.SpecificCharacterSet = ""
    ident.SOPClassUID = ""
    ident.SOPInstanceUID = ""
    ident.ProcedureStepState = "SCHEDULED"
    ident.ProcedureStepLabel = ""
    ident.ScheduledStationNameCodeSequence = Sequence([code_item(station, "", "")])
    ident.ScheduledProcedureStepStartDateTime = f"{first:%Y%m%d%H%M%S}-{day:%Y%m%d}235959"
    ident.ScheduledWorkitemCodeSequence = Sequence([])
    ident.ScheduledProcessingParametersSequence = Sequence([])
    ident.InputInformationSequence = Sequence([])
    ident.StudyInstanceUID = ""
    ident.PatientName = ""
    ident.PatientID = ""
    ident.PatientBirthDate = ""
    ident.PatientSex = ""
    ident.InputReadinessState = ""
    return ident


def progress_dataset(
    profile: Profile,
    transaction: str | None,
    percent: float,
    beam: int | None,
    description: str = "",
) -> Dataset:
    """RO-26 modifications; ``transaction`` None leaves the Transaction UID out;
    ``description`` what the TMS console should show beside the share (a flag)."""
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    info = Dataset()
    info.ProcedureStepProgress = round(min(max(percent, 0.0), 100.0), 2)
    if description:
        info.ProcedureStepProgressDescription = description[:1024]
    ds.ProcedureStepProgressInformationSequence = Sequence([info])
    if beam is not None:
        concept = profile.concept("beam_number_in_progress")
        parameter = Dataset()
        parameter.ValueType = "TEXT"
        parameter.ConceptNameCodeSequence = Sequence(
            [code_item(concept.value, concept.scheme, concept.meaning)]
        )
        parameter.TextValue = str(beam)
        performed = Dataset()
        performed.PerformedProcessingParametersSequence = Sequence([parameter])
        performed.OutputInformationSequence = Sequence([])
        performed.NonDICOMOutputCodeSequence = Sequence([])
        ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return ds


def final_update_dataset(
    ups: Dataset,
    station: str,
    transaction: str | None,
    started: dt.datetime,
    stored: list[Dataset],
    archive_ae_title: str,
    reference_style: str,
) -> Dataset:
    """RO-21: the Performed Procedure Sequence; Output Information = exactly what was stored."""
    performed = Dataset()
    performed.PerformedStationNameCodeSequence = Sequence(
        [code_item(station, STATION_SCHEME, "Performed Station Name")]
    )
    performed.PerformedProcedureStepStartDateTime = _dt(started)
    performed.PerformedProcedureStepEndDateTime = _dt(dt.datetime.now())
    performed.PerformedWorkitemCodeSequence = Sequence([ups.ScheduledWorkitemCodeSequence[0]])
    by_series: dict[str, list[InstanceReference]] = {}
    for ds in stored:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(
            InstanceReference(
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                archive_ae_title,
            )
        )
    performed.OutputInformationSequence = Sequence(
        [reference_item(refs, reference_style) for refs in by_series.values()]
    )
    performed.NonDICOMOutputCodeSequence = Sequence([])
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return ds


def cancel_dataset(transaction: str | None, percent: float, reason: str, cause: str) -> Dataset:
    """RO-25 before CANCELED: the progress reached, when, why in words (seed RO-18
    3.18.4.1) and why as a CID 9300 code: the Final State X attributes of PS3.4 Table
    CC.2.5-3, which the Change State request itself cannot carry."""
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    ds.ProcedureStepProgressInformationSequence = Sequence(
        [ups_attributes.cancellation_item(percent, reason[:1024], cause)]
    )
    return ds
