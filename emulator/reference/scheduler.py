"""Schedules treatment sessions as the four UPS RO-17 requires, and their continuations.

A session is acquisition, registration, adjustment and delivery for one fraction of one
plan at one station. Each UPS carries exactly the inputs it needs (Note 8): the planning
CT series for the CBCT acquisition, the RT Plan from the Archive and the RT Beams Delivery
Instruction from the TMS for the delivery. When a delivery ends CANCELED part-way, the
stored RT Beams Treatment Record says what was delivered, and the continuation session
asks for exactly the rest (Note 5, 'CONTINUATION').

A brachytherapy plan (an RT Plan with Brachy Application Setups) is scheduled for an
afterloader: one delivery UPS, workitem 121726 "RT Treatment with Internal Verification"
(PS3.16 CID 9241, Radiotherapy General Workitem Definition: treatment whatever the
modality), the RT Plan its input. Its continuation carries the fraction's earlier RT Brachy
Treatment Records, from which the afterloader gives each dwell exactly its rest.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from emulator import ups_attributes
from emulator.brachy_fraction import anything_left, remaining_reference_s
from emulator.profile import Code, Profile, ProfileError, load_yaml, workitem_codes
from emulator.reference.ups_store import SessionRecord, UpsRecord, UpsStore
from emulator.store import ObjectStore, StoredInstance
from emulator.store.admission import admit
from emulator.store.object_store import StoreOutcome
from emulator.synth import ContinuationRange, PatientContext, build_delivery_instruction
from emulator.synth.brachy_access import is_brachy_plan
from emulator.synth.common import STUDY_ATTRIBUTES, code_item, new_dataset
from emulator.synth.plan_access import specified_metersets
from emulator.ups_references import InstanceReference, reference_item, references_in

LOG = logging.getLogger("tdw.tms.scheduler")
STATION_SCHEME = "99TDWEMU"
STEP_OFFSETS = {"acquisition": 0, "registration": 3, "adjustment": 6, "delivery": 8}
METERSET_TOLERANCE = 0.01  # MU: below this a beam counts as fully delivered


def within_one_day(start: dt.datetime) -> dt.datetime:
    """The start of a session whose four steps all fall on ``start``'s day.

    A device knows a session by its patient and day (RO-17 queries a day's range), so a
    session begun at 23:55 whose delivery fell after midnight would reach it as two: three
    UPS today and one tomorrow. Such a session starts early enough to end by 23:59.
    """
    latest = dt.datetime.combine(start.date(), dt.time(23, 59)) - dt.timedelta(
        minutes=max(STEP_OFFSETS.values())
    )
    return min(start, latest)


class SchedulingError(ValueError):
    """The plan or its inputs are not in the stores, so no session can be scheduled."""


@dataclass(frozen=True)
class ContinuationOutcome:
    """What a canceled delivery leaves to do, computed from its treatment records."""

    delivered: dict[int, float]
    continuations: dict[int, ContinuationRange]
    omitted: dict[int, str]
    untouched: list[int]

    @property
    def anything_left(self) -> bool:
        return bool(self.continuations or self.untouched)


def step_codes() -> dict[str, Code]:
    codes = workitem_codes()
    return {step: codes[code] for step, code in load_yaml("workitems.yaml")["tms_defaults"].items()}


def _dt(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def continuation_for(
    plan: Dataset, instruction: Dataset, records: list[Dataset]
) -> ContinuationOutcome:
    """What is left of a fraction after the records of one interrupted session.

    The instruction tells what had already been delivered before this session (omitted
    beams were complete, CONTINUATION beams started at their ContinuationStartMeterset);
    the records add what this session delivered. Over-delivery is never scheduled again.
    """
    specified = specified_metersets(plan)
    before: dict[int, float] = {}
    for task in instruction.get("BeamTaskSequence", []):
        if task.TreatmentDeliveryType == "CONTINUATION":
            before[int(task.ReferencedBeamNumber)] = float(task.ContinuationStartMeterset)
    for omitted in instruction.get("OmittedBeamTaskSequence", []):
        number = int(omitted.ReferencedBeamNumber)
        before[number] = specified.get(number, 0.0)
    now: dict[int, float] = {}
    for record in records:
        for beam in record.get("TreatmentSessionBeamSequence", []):
            number = int(beam.ReferencedBeamNumber)
            now[number] = now.get(number, 0.0) + float(beam.DeliveredPrimaryMeterset or 0)
    delivered = {n: round(before.get(n, 0.0) + now.get(n, 0.0), 4) for n in specified}
    continuations, omitted, untouched = {}, {}, []
    for number, total in specified.items():
        done = delivered[number]
        if done >= total - METERSET_TOLERANCE:
            omitted[number] = "delivered in full before the interruption"
        elif done > 0:
            continuations[number] = ContinuationRange(done, total)
        else:
            untouched.append(number)
    return ContinuationOutcome(delivered, continuations, omitted, untouched)


class Scheduler:
    """Creates sessions in the UPS store from plans held by the Archive's object store."""

    def __init__(
        self,
        ups: UpsStore,
        archive_store: ObjectStore,
        tms_store: ObjectStore,
        profile: Profile,
        tms_ae_title: str,
        archive_ae_title: str,
        station_names: dict[str, str] | None = None,
    ) -> None:
        self.ups = ups
        self.archive_store = archive_store
        self.tms_store = tms_store
        self.profile = profile
        self.tms_ae_title = tms_ae_title
        self.archive_ae_title = archive_ae_title
        self.station_names = station_names or {}
        self._station_locks: dict[str, threading.Lock] = {}
        self._station_locks_guard = threading.Lock()

    def station_lock(self, station: str) -> threading.Lock:
        """The lock that makes a station's "what comes next" decisions one at a time.

        Ending a step CANCELED and scheduling what follows it (a continuation, the session
        again) must look atomic to whoever else schedules for the station (the feeder):
        between the two, the station has no pending UPS, and a next fraction scheduled
        then for the same patient and day would be merged with the continuation by the
        device (one session per patient and day) and withheld after either is canceled.
        """
        with self._station_locks_guard:
            return self._station_locks.setdefault(station, threading.Lock())

    # -- inputs ------------------------------------------------------------------------------

    def _archived(self, sop_instance_uid: str) -> tuple[StoredInstance, Dataset]:
        instance = self.archive_store.get(sop_instance_uid)
        if instance is None:
            raise SchedulingError(f"{sop_instance_uid} is not in the Archive")
        return instance, self.archive_store.read(instance, stop_before_pixels=True)

    def _ct_references(self, plan: Dataset) -> list[InstanceReference]:
        """The CT series the plan's structure set was drawn on."""
        if "ReferencedStructureSetSequence" not in plan:
            raise SchedulingError("the plan references no structure set, so no CT series")
        ss_uid = plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
        _, structure_set = self._archived(ss_uid)
        study = structure_set.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        series_uid = study.RTReferencedSeriesSequence[0].SeriesInstanceUID
        ct = self.archive_store.select("series_instance_uid = ?", (series_uid,))
        if not ct:
            raise SchedulingError(f"CT series {series_uid} is not in the Archive")
        return [
            InstanceReference(
                i.values["study_instance_uid"],
                series_uid,
                i.sop_class_uid,
                i.sop_instance_uid,
                self.archive_ae_title,
            )
            for i in ct
        ]

    def _store_at_tms(self, ds: Dataset) -> InstanceReference:
        """Keeps a transient object (instruction, record copy) for RO-20 retrieval; one the
        TMS holds already (a record a rescheduled session needs again) is kept as it is."""
        if self.tms_store.get(str(ds.SOPInstanceUID)) is None:
            encoded = _encode_part10(ds)
            outcome: StoreOutcome = self.tms_store.put(encoded, admit(encoded), calling_ae="tms")
        else:
            outcome = StoreOutcome(0)
        if outcome.status != 0:
            raise SchedulingError(f"TMS store refused {ds.SOPInstanceUID}: {outcome.comment}")
        return InstanceReference(
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            self.tms_ae_title,
        )

    # -- UPS ---------------------------------------------------------------------------------

    def _parameters(self, delivery_type: str, plan: Dataset, fraction: int) -> Sequence:
        items = [self._text_item(self.profile.concept("treatment_delivery_type"), delivery_type)]
        planned = int(plan.FractionGroupSequence[0].NumberOfFractionsPlanned or 0)
        for name in self.profile.scheduled_parameters:
            concept = self.profile.concept(name)
            if name == "plan_label":
                items.append(self._text_item(concept, str(plan.RTPlanLabel)))
            elif name == "current_fraction_number":
                items.append(self._numeric_item(concept, fraction))
            elif name == "number_of_fractions_planned":
                items.append(self._numeric_item(concept, planned))
        return Sequence(items)

    @staticmethod
    def _text_item(concept: Code, text: str) -> Dataset:
        item = Dataset()
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence(
            [code_item(concept.value, concept.scheme, concept.meaning)]
        )
        item.TextValue = text
        return item

    @staticmethod
    def _numeric_item(concept: Code, value: int) -> Dataset:
        item = Dataset()
        item.ValueType = "NUMERIC"
        item.ConceptNameCodeSequence = Sequence(
            [code_item(concept.value, concept.scheme, concept.meaning)]
        )
        measured = Dataset()
        measured.NumericValue = value
        measured.MeasurementUnitsCodeSequence = Sequence([code_item("1", "UCUM", "no units")])
        item.MeasuredValueSequence = Sequence([measured])
        return item

    def _ups(
        self,
        step: str,
        code: Code,
        plan: Dataset,
        station: str,
        start: dt.datetime,
        fraction: int,
        delivery_type: str,
        inputs: list[list[InstanceReference]],
    ) -> Dataset:
        ds = new_dataset(self.profile.sop_classes["ups_push"])
        del ds.file_meta
        PatientContext.from_dataset(plan).apply_patient_study(ds)
        for keyword in STUDY_ATTRIBUTES:
            delattr(ds, keyword)  # the UPS IOD carries only the Study Instance UID of these
        ds.ScheduledProcedureStepPriority = "MEDIUM"
        ds.ProcedureStepLabel = f"Fx {fraction} {code.meaning}"[:64]
        ds.WorklistLabel = f"Station {station}"[:64]
        ds.ScheduledStationNameCodeSequence = Sequence(
            [
                code_item(
                    station,
                    STATION_SCHEME,
                    self.station_names.get(station, f"Treatment station {station}"),
                )
            ]
        )
        moment = start + dt.timedelta(minutes=STEP_OFFSETS[step])
        ds.ScheduledProcedureStepStartDateTime = _dt(moment)
        ds.ExpectedCompletionDateTime = _dt(moment + dt.timedelta(minutes=3))
        ds.ScheduledProcedureStepModificationDateTime = _dt(dt.datetime.now())
        ds.ScheduledWorkitemCodeSequence = Sequence(
            [code_item(code.value, code.scheme, code.meaning)]
        )
        ds.ScheduledProcessingParametersSequence = self._parameters(delivery_type, plan, fraction)
        ds.InputReadinessState = "READY"
        style = self.profile.sop_classes.reference_style
        ds.InputInformationSequence = Sequence([reference_item(r, style) for r in inputs if r])
        ds.ProcedureStepState = "SCHEDULED"
        ds.ReferencedRequestSequence = Sequence([])
        ds.ScheduledHumanPerformersSequence = Sequence([])
        return ds

    def schedule_session(
        self,
        plan_uid: str,
        station: str,
        start: dt.datetime,
        fraction: int,
        continuation: ContinuationOutcome | None = None,
        continues_session: str = "",
        extra_tms_inputs: list[Dataset] | None = None,
    ) -> str:
        """Schedules one session of four UPS (one, for a brachytherapy plan); returns its
        session id."""
        start = within_one_day(start)
        instance, plan = self._archived(plan_uid)
        if plan.SOPClassUID != self.profile.sop_classes["rt_plan"]:
            raise SchedulingError(f"{plan_uid} is not an RT Plan")
        if is_brachy_plan(plan):
            records = list(extra_tms_inputs or [])
            return self._schedule_brachy(
                instance, plan, station, start, fraction, records, continues_session
            )
        ct = self._ct_references(plan)
        ctx = PatientContext.from_dataset(plan)
        instruction = build_delivery_instruction(
            ctx,
            plan,
            self.profile.sop_classes,
            fraction_number=fraction,
            continuations=continuation.continuations if continuation else None,
            omitted_beams=continuation.omitted if continuation else None,
        )
        instruction_ref = self._store_at_tms(instruction)
        extra_refs = [self._store_at_tms(ds) for ds in extra_tms_inputs or []]
        plan_ref = InstanceReference(
            instance.values["study_instance_uid"],
            instance.values["series_instance_uid"],
            instance.sop_class_uid,
            instance.sop_instance_uid,
            self.archive_ae_title,
        )
        delivery_type = "CONTINUATION" if continuation else "TREATMENT"
        codes = step_codes()
        inputs = {
            "acquisition": [ct],
            "registration": [],
            "adjustment": [],
            "delivery": [[plan_ref], [instruction_ref], *([r] for r in extra_refs)],
        }
        steps = [
            (
                step,
                self._ups(
                    step, codes[step], plan, station, start, fraction, delivery_type, inputs[step]
                ),
            )
            for step in ("acquisition", "registration", "adjustment", "delivery")
        ]
        session_id = str(generate_uid())
        record = SessionRecord(
            session_id,
            station,
            str(plan.PatientID),
            plan_uid,
            fraction,
            delivery_type,
            continues_session,
            continuation.delivered if continuation else {},
        )
        self.ups.add_session(record, steps)
        LOG.info(
            "scheduled %s session %s fraction %d at %s for %s",
            delivery_type,
            session_id,
            fraction,
            station,
            plan.PatientID,
        )
        return session_id

    def _schedule_brachy(
        self,
        instance: StoredInstance,
        plan: Dataset,
        station: str,
        start: dt.datetime,
        fraction: int,
        records: list[Dataset],
        continues_session: str,
    ) -> str:
        """An afterloader's session: one delivery UPS with the plan (from the Archive) and,
        for a continuation, the fraction's earlier records (kept at the TMS) as inputs."""
        plan_ref = InstanceReference(
            instance.values["study_instance_uid"],
            instance.values["series_instance_uid"],
            instance.sop_class_uid,
            instance.sop_instance_uid,
            self.archive_ae_title,
        )
        record_refs = [self._store_at_tms(ds) for ds in records]
        delivery_type = "CONTINUATION" if records else "TREATMENT"
        code = step_codes()["delivery"]
        ups = self._ups(
            "delivery",
            code,
            plan,
            station,
            start,
            fraction,
            delivery_type,
            [[plan_ref], *([r] for r in record_refs)],
        )
        session_id = str(generate_uid())
        record = SessionRecord(
            session_id,
            station,
            str(plan.PatientID),
            str(plan.SOPInstanceUID),
            fraction,
            delivery_type,
            continues_session,
            {},
        )
        self.ups.add_session(record, [("delivery", ups)])
        LOG.info(
            "scheduled brachy %s session %s fraction %d at %s for %s",
            delivery_type,
            session_id,
            fraction,
            station,
            plan.PatientID,
        )
        return session_id

    def _schedule_brachy_continuation(
        self, session: SessionRecord, canceled: UpsRecord, find_object: Callable
    ) -> str | None:
        """What is left of a brachy fraction after the canceled session's record and the
        fraction's earlier ones; nothing scheduled (and a note) when nothing is left or a
        record's count was never confirmed."""
        uid = self.profile.sop_classes["rt_brachy_treatment_record"]
        performed = canceled.dataset.get("UnifiedProcedureStepPerformedProcedureSequence") or []
        outputs = performed[0].get("OutputInformationSequence", []) if performed else []
        inputs = canceled.dataset.get("InputInformationSequence", [])
        records = [
            ds
            for ref in [*references_in(inputs), *references_in(outputs)]
            if ref.sop_class_uid == uid and (ds := find_object(ref.sop_instance_uid))
        ]
        new = [
            r
            for r in records
            if str(r.SOPInstanceUID) in {x.sop_instance_uid for x in references_in(outputs)}
        ]
        if not new:
            self._note(session, "continuation needs review: no RT Brachy Treatment Record")
            return None
        unknown = [
            int(setup.get("ReferencedBrachyApplicationSetupNumber", 0))
            for record in new
            for setup in record.get("TreatmentSessionApplicationSetupSequence", [])
            if setup.get("TreatmentTerminationStatus") == "UNKNOWN"
        ]
        if unknown:
            self._note(session, "continuation needs review: a channel ended UNKNOWN")
            return None
        _, plan = self._archived(session.plan_uid)
        if not anything_left(remaining_reference_s(plan, records)):
            self._note(session, "all dwells delivered; nothing to continue")
            return None
        start = dt.datetime.now().replace(microsecond=0) + dt.timedelta(minutes=1)
        return self.schedule_session(
            session.plan_uid,
            session.station_code,
            start,
            session.fraction_number,
            continues_session=session.session_id,
            extra_tms_inputs=records,
        )

    def _note(self, session: SessionRecord, note: str) -> None:
        self.ups.set_session_note(session.session_id, note)
        LOG.warning("session %s: %s", session.session_id, note)

    def schedule_fractions(
        self,
        plan_uid: str,
        station: str,
        first_start: dt.datetime,
        count: int,
        first: int = 1,
        weekends: bool = False,
    ) -> list[str]:
        """One session per weekday (every day, with ``weekends``) from ``first_start``,
        numbering fractions from ``first``."""
        sessions, day = [], first_start
        for fraction in range(first, first + count):
            while day.weekday() >= 5 and not weekends:
                day += dt.timedelta(days=1)
            sessions.append(self.schedule_session(plan_uid, station, day, fraction))
            day += dt.timedelta(days=1)
        return sessions

    def schedule_continuation(
        self, canceled: UpsRecord, find_object: Callable[[str], Dataset | None]
    ) -> str | None:
        """After a delivery UPS ended CANCELED part-way, schedules the rest of the fraction.

        Returns the new session id, or None (with a note on the session) when nothing is
        left or when no treatment record says what was delivered: guessing is not safe.
        """
        session = self.ups.session(canceled.session_id)
        if session is None:
            return None
        _, plan = self._archived(session.plan_uid)
        if is_brachy_plan(plan):
            return self._schedule_brachy_continuation(session, canceled, find_object)
        performed = canceled.dataset.get("UnifiedProcedureStepPerformedProcedureSequence") or []
        outputs = performed[0].get("OutputInformationSequence", []) if performed else []
        record_uid = self.profile.sop_classes["rt_beams_treatment_record"]
        records = [
            ds
            for ref in references_in(outputs)
            if ref.sop_class_uid == record_uid and (ds := find_object(ref.sop_instance_uid))
        ]
        instruction = next(
            (
                ds
                for ref in references_in(canceled.dataset.get("InputInformationSequence", []))
                if ref.sop_class_uid == self.profile.sop_classes["rt_beams_delivery_instruction"]
                and (ds := find_object(ref.sop_instance_uid))
            ),
            None,
        )
        if not records or instruction is None:
            note = "continuation needs review: no RT Beams Treatment Record in the final update"
            self.ups.set_session_note(session.session_id, note)
            LOG.warning("session %s: %s", session.session_id, note)
            return None
        unconfirmed = [
            int(beam.ReferencedBeamNumber)
            for record in records
            for beam in record.get("TreatmentSessionBeamSequence", [])
            if beam.get("TreatmentTerminationStatus") == "UNKNOWN"
        ]
        if unconfirmed:
            # The device could not confirm the machine's count: what the record says may be
            # short of what was given, and a continuation from it could deliver dose twice.
            note = (
                f"continuation needs review: beam(s) {unconfirmed} ended with termination "
                "UNKNOWN (the machine's count was not confirmed)"
            )
            self.ups.set_session_note(session.session_id, note)
            LOG.warning("session %s: %s", session.session_id, note)
            return None
        _, plan = self._archived(session.plan_uid)
        outcome = continuation_for(plan, instruction, records)
        if not outcome.anything_left:
            note = "all beams delivered; nothing to continue"
            self.ups.set_session_note(session.session_id, note)
            return None
        start = dt.datetime.now().replace(microsecond=0) + dt.timedelta(minutes=1)
        return self.schedule_session(
            session.plan_uid,
            session.station_code,
            start,
            session.fraction_number,
            continuation=outcome,
            continues_session=session.session_id,
            extra_tms_inputs=records,
        )

    def add_created(self, ups: Dataset) -> str:
        """A UPS another system created (N-CREATE), kept as a session of its own."""
        return self.add_created_session([ups])

    def add_created_session(self, members: list[Dataset]) -> str:
        """UPS another system created, kept as one session: the station and patient they
        name, each step from its Scheduled Workitem code, and what a continuation needs
        (the RT Plan an input references, the fraction and delivery type the Scheduled
        Processing Parameters carry), so a canceled delivery is continued as for a
        session this TMS scheduled itself."""
        from emulator.performer.actors import step_of

        first = members[0]
        items = first.get("ScheduledStationNameCodeSequence") or []
        station = str(items[0].get("CodeValue", "")) if items else ""
        plan_uid = next(
            (
                ref.sop_instance_uid
                for ups in members
                for ref in references_in(ups.get("InputInformationSequence") or [])
                if ref.sop_class_uid == self.profile.sop_classes["rt_plan"]
            ),
            "",
        )
        fraction = self._parameter(members, "current_fraction_number")
        delivery_type = self._parameter(members, "treatment_delivery_type")
        record = SessionRecord(
            str(generate_uid()),
            station,
            str(first.get("PatientID", "")),
            plan_uid,
            int(fraction) if str(fraction).isdigit() else 1,
            str(delivery_type or "TREATMENT"),
        )
        self.ups.add_session(record, [(step_of(u) or "created", u) for u in members])
        return record.session_id

    def _parameter(self, members: list[Dataset], name: str) -> str:
        """A Scheduled Processing Parameter's text or number, by the edition's concept."""
        try:
            concept = self.profile.concept(name)
        except ProfileError:  # the edition does not schedule this parameter
            return ""
        for ups in members:
            for item in ups.get("ScheduledProcessingParametersSequence") or []:
                names = item.get("ConceptNameCodeSequence") or []
                if not names or str(names[0].get("CodeValue", "")) != concept.value:
                    continue
                if "TextValue" in item:
                    return str(item.TextValue)
                measured = item.get("MeasuredValueSequence") or []
                if measured:
                    return str(int(float(measured[0].NumericValue)))
        return ""

    # -- after a canceled step -------------------------------------------------------------

    def end_session_after(
        self,
        canceled: UpsRecord,
        find_object: Callable[[str], Dataset | None],
        reschedule: bool,
    ) -> str | None:
        """Ends the SCHEDULED steps left in the canceled step's session and, if
        ``reschedule``, schedules the session's work again as a new session.

        A session whose positioning step was canceled cannot go on: delivering on a
        position nobody verified is not safe. Its later steps are CANCELED with a coded
        reason (CID 9300), so no device finds them and no UPS stays SCHEDULED for a session
        that can no longer run. Returns the new session's id, if one was scheduled.
        """
        session = self.ups.session(canceled.session_id)
        if session is None:
            return None
        cause = "rescheduled" if reschedule else "rescheduling_recommended"
        reason = f"the session's {canceled.step} ended CANCELED"
        items = canceled.dataset.get("ProcedureStepProgressInformationSequence") or []
        why = str(items[0].get("ReasonForCancellation", "") or "") if items else ""
        if why:  # the later steps say why, so a console shows it on each of them
            reason += f": {why}"
        ended = self.cancel_scheduled(session.session_id, reason, cause, after=canceled.step)
        new_session = self._schedule_again(session, find_object) if reschedule else None
        note = f"{reason}; {len(ended)} later step(s) canceled; " + (
            f"scheduled again as session {new_session}" if new_session else "needs rescheduling"
        )
        self.ups.set_session_note(session.session_id, note)
        LOG.info("session %s: %s", session.session_id, note)
        return new_session

    def cancel_scheduled(
        self, session_id: str, reason: str, cause: str, after: str = ""
    ) -> list[str]:
        """Ends the SCHEDULED UPS of a session that come after step ``after`` (all, if
        none is named) as CANCELED, meeting the final-state table (progress, cancellation
        date-time and a CID 9300 code)."""
        ended = []
        order = list(STEP_OFFSETS)
        for record in self.ups.select("session_id = ? AND state = 'SCHEDULED'", [session_id]):
            if after and order.index(record.step) <= order.index(after):
                continue

            def decide(current: UpsRecord | None) -> UpsRecord | None:
                if current is None or current.state != "SCHEDULED":
                    return None
                after = deepcopy(current.dataset)
                after.ProcedureStepState = "CANCELED"
                after.ProcedureStepProgressInformationSequence = Sequence(
                    [ups_attributes.cancellation_item(0.0, reason, cause)]
                )
                return replace(current, state="CANCELED", dataset=after)

            if self.ups.transition(record.sop_instance_uid, decide) is not None:
                ended.append(record.sop_instance_uid)
        return ended

    def _schedule_again(
        self, session: SessionRecord, find_object: Callable[[str], Dataset | None]
    ) -> str:
        """The same fraction as a new session: the same continuation ranges and previous
        records for a CONTINUATION session, a whole fraction for a TREATMENT one."""
        delivery = self.ups.select("session_id = ? AND step = 'delivery'", [session.session_id])
        refs = (
            references_in(delivery[0].dataset.get("InputInformationSequence", []))
            if (delivery)
            else []
        )
        uids = self.profile.sop_classes
        kept = (uids["rt_beams_treatment_record"], uids["rt_brachy_treatment_record"])
        records = [
            ds
            for ref in refs
            if ref.sop_class_uid in kept and (ds := find_object(ref.sop_instance_uid))
        ]
        continuation = None
        if session.delivery_type == "CONTINUATION":
            instruction = next(
                ds
                for ref in refs
                if ref.sop_class_uid == uids["rt_beams_delivery_instruction"]
                and (ds := find_object(ref.sop_instance_uid))
            )
            _, plan = self._archived(session.plan_uid)
            continuation = continuation_for(plan, instruction, [])
        return self.schedule_session(
            session.plan_uid,
            session.station_code,
            dt.datetime.now().replace(microsecond=0) + dt.timedelta(minutes=1),
            session.fraction_number,
            continuation=continuation,
            continues_session=session.session_id,
            extra_tms_inputs=records,
        )


def _encode_part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
