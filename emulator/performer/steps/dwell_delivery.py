"""The afterloader's delivery step: an HDR brachytherapy fraction (or what is left of one)
checked against the machine before any source moves, treated channel by channel and
dwell by dwell, and an RT Brachy Treatment Record of exactly what the machine measured.

Before the claim, the plan is held to the machine: the source it was planned with must be
the source the machine holds (isotope, and strength decayed to now within 5 %), its
channels must exist and be long enough, its dwells within the machine's times once
corrected for today's source, and its own totals must agree with its dwells (the data
arrived intact). A failure is a refusal in words, and nothing moves.
"""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset

from devices.afterloader import Afterloader
from emulator.brachy_fraction import remaining_reference_s, todays_programmes
from emulator.performer.dwell_delivery import ChannelDelivery, ChannelTask
from emulator.performer.outbox import Claim
from emulator.performer.steps.base import Cancel, Step, StepInputs, Work
from emulator.performer.steps.session_state import SessionState
from emulator.results.brachy_record import (
    BrachySession,
    DeliveredChannel,
    DeliveredDwell,
    build_brachy_treatment_record,
)
from emulator.results.treatment_record import TreatmentMachine
from emulator.synth.brachy_access import (
    is_brachy_plan,
    plan_integrity_problems,
    planned_source,
)
from emulator.ups_references import references_in

SOURCE_STRENGTH_TOLERANCE = 0.05  # the plan's source decayed to now vs the machine's
# A channel delivered this far from its specified time (seconds, or share of it) is flagged.
CHANNEL_TIME_TOLERANCE_S = 0.1


def _parameter(ups: Dataset, meaning: str) -> str:
    """A Scheduled Processing Parameter's value by its concept's meaning ("" if absent)."""
    for item in ups.get("ScheduledProcessingParametersSequence") or []:
        names = item.get("ConceptNameCodeSequence") or []
        if not names or meaning.lower() not in str(names[0].get("CodeMeaning", "")).lower():
            continue
        if "TextValue" in item:
            return str(item.TextValue)
        measured = item.get("MeasuredValueSequence") or []
        if measured:
            return str(int(float(measured[0].NumericValue)))
    return ""


def _fraction_of(records: list[Dataset]) -> int | None:
    """The fraction an earlier session of this fraction recorded (a continuation's)."""
    for record in reversed(records):
        for setup in record.get("TreatmentSessionApplicationSetupSequence") or []:
            if "CurrentFractionNumber" in setup:
                return int(setup.CurrentFractionNumber)
    return None


def _channel_json(channel: DeliveredChannel) -> dict:
    dwells = [{**d.__dict__, "moment": d.moment.isoformat()} for d in channel.dwells]
    return {**channel.__dict__, "dwells": dwells}


def _channel_from_json(data: dict) -> DeliveredChannel:
    dwells = [
        DeliveredDwell(**{**d, "moment": dt.datetime.fromisoformat(d["moment"])})
        for d in data["dwells"]
    ]
    return DeliveredChannel(**{**data, "dwells": dwells})


class DwellDeliveryStep(Step):
    """RO-24 for an afterloader: the fraction's dwells, recorded as measured."""

    name = "delivery"
    role = Afterloader
    required_inputs = (("rt_plan", "RT Plan"),)

    def read_inputs(self, ups: Dataset, inputs: StepInputs, session: SessionState) -> list[str]:
        uids = self.context.uids
        refs = references_in(ups.get("InputInformationSequence") or [])
        plans = [
            inputs.held[r.sop_instance_uid] for r in refs if r.sop_class_uid == uids["rt_plan"]
        ]
        if not plans:
            return ["RO-18: the delivery's inputs hold no RT Plan"]
        plan = inputs.plan = plans[0]
        if not is_brachy_plan(plan):
            return ["the RT Plan has no brachy application setup: a linac treats it"]
        inputs.previous_records = sorted(
            (
                ds
                for ds in inputs.held.values()
                if ds.SOPClassUID == uids["rt_brachy_treatment_record"]
            ),
            key=lambda ds: (str(ds.TreatmentDate), str(ds.TreatmentTime)),
        )
        return []

    def machine_problems(self, plan: Dataset, previous: list[Dataset]) -> tuple[list, list[str]]:
        """The plan held to the machine, after the claim and before any source moves: its
        own totals (the data arrived intact), its source against the one loaded, and what
        is left of the fraction, in today's seconds, against the machine's limits.
        Returns the channel tasks, and the problems that forbid treating them."""
        problems = plan_integrity_problems(plan)
        if problems:
            return [], [f"the RT Plan is not intact: {p}" for p in problems]
        problems = self._source_problems(plan)
        if problems:
            return [], problems
        remaining = remaining_reference_s(plan, previous)
        tasks = [
            ChannelTask(planned, programme)
            for planned, programme in todays_programmes(
                plan, remaining, self.machine.source(), dt.datetime.now()
            )
        ]
        if not tasks:
            return [], ["nothing is left of this fraction: every dwell was delivered"]
        return tasks, self._limit_problems(tasks)

    def _source_problems(self, plan: Dataset) -> list[str]:
        """The plan's source against the machine's, both decayed to now."""
        planned, held = planned_source(plan), self.machine.source()
        now = dt.datetime.now()
        if planned.isotope.replace(" ", "").lower() != held.isotope.replace(" ", "").lower():
            return [
                f"source mismatch: the plan was made for {planned.isotope}, the machine holds "
                f"{held.isotope}"
            ]
        expected, actual = planned.strength_at(now), held.strength_at(now)
        if abs(expected / actual - 1.0) > SOURCE_STRENGTH_TOLERANCE:
            return [
                f"source mismatch: the plan's {planned.isotope} source would be "
                f"{expected:.0f} µGy/h at 1 m now, the machine's is {actual:.0f} "
                f"(beyond {SOURCE_STRENGTH_TOLERANCE:.0%}): it was planned for another source"
            ]
        return []

    def _limit_problems(self, tasks: list[ChannelTask]) -> list[str]:
        """The channels and dwells, as today's source needs them, against the machine."""
        limits = self.machine.afterloader_limits()
        problems = []
        for task in tasks:
            channel = task.programme
            if channel.channel > limits.channels:
                problems.append(f"channel {channel.channel}: the machine has {limits.channels}")
            if channel.length_mm > limits.max_channel_length_mm:
                problems.append(
                    f"channel {channel.channel}: {channel.length_mm:g} mm is longer than the "
                    f"machine's {limits.max_channel_length_mm:g} mm"
                )
            if len(channel.dwells) > limits.max_dwells_per_channel:
                problems.append(f"channel {channel.channel}: {len(channel.dwells)} dwells")
            for dwell in channel.dwells:
                if not limits.min_dwell_s <= dwell.time_s <= limits.max_dwell_s:
                    problems.append(
                        f"channel {channel.channel} dwell {dwell.index}: {dwell.time_s:.1f} s "
                        f"with today's source, outside {limits.min_dwell_s:g}.."
                        f"{limits.max_dwell_s:g} s"
                    )
        return problems

    def perform(self, work: Work) -> float:
        context, claim, outcome = self.context, work.claim, work.outcome
        plan = work.inputs.plan
        tasks, problems = self.machine_problems(plan, work.inputs.previous_records)
        if problems:  # refused: no source has moved, nothing is recorded
            raise Cancel(
                "refused before any source moved: " + "; ".join(problems), 0.0, [],
                cause="refused_input",
            )  # fmt: skip
        work.inputs.tasks = tasks
        planned_s = sum(t.programme.total_s for t in tasks)
        previous = work.inputs.previous_records
        delivery_type = "CONTINUATION" if previous else "TREATMENT"
        fraction = int(_parameter(claim.ups, "fraction number") or _fraction_of(previous) or 1)
        started = dt.datetime.now().replace(microsecond=0)
        journal_context = {
            "plan_uid": str(plan.SOPInstanceUID),
            "previous_record_uids": [str(ds.SOPInstanceUID) for ds in previous],
            "study_instance_uid": str(claim.ups.StudyInstanceUID),
            "fraction": fraction,
            "session_start": started.isoformat(),
            "planned_s": planned_s,
            "delivery_type": delivery_type,
        }
        context.journal.work_started(claim.uid, journal_context)

        def share(delivery: ChannelDelivery) -> float:
            given = sum(c.delivered_s for c in delivery.so_far())
            return given / planned_s * 100 if planned_s else 0.0

        def channel_started(task: ChannelTask) -> None:
            reason = context.cancel_requests.requested(claim.uid)
            if reason:  # asked between channels: no further source goes out
                raise Cancel(reason, cause=context.cancel_requests.cause(claim.uid))
            context.progress(claim, share(delivery), None)
            if context.on_unit_start:
                context.on_unit_start(task)

        def delivered(delivery: ChannelDelivery) -> None:
            context.journal.work_done(claim.uid, [_channel_json(c) for c in delivery.so_far()])
            claim.reporter.offer(share(delivery))

        delivery = ChannelDelivery(
            self.machine, tasks, context.on_event, channel_started, on_delivered=delivered
        )

        def record_of(channels: list[DeliveredChannel]) -> list[Dataset]:
            given = [c for c in channels if c.dwells]
            return [self.record(journal_context, channels, plan, previous)] if given else []

        try:
            result = delivery.run()
        except Cancel as refused:
            channels = delivery.outcome.channels
            refused.percent = round(sum(c.delivered_s for c in channels) / planned_s * 100, 2)
            refused.stored = context.store_results(
                record_of(channels), "RO-24", claim.uid, refused.percent
            )
            outcome.delivered = {c.channel_number: c.delivered_s for c in channels}
            raise
        for channel in result.channels:
            context.metrics.channel(channel.termination, channel.delivered_s)
        outcome.delivered = {c.channel_number: c.delivered_s for c in result.channels}
        outcome.delivery_type = delivery_type
        outcome.flags = self._time_flags(result.channels)
        percent = round(result.delivered_s / planned_s * 100, 2) if planned_s else 0.0
        if result.interrupted:
            context.progress(claim, percent, None)
            stored = []
            if result.channels:
                stored = context.store_results(
                    record_of(result.channels), "RO-24", claim.uid, percent
                )
            if result.device_error:
                raise Cancel(result.reason, percent, stored, cause="device_error")
            cause = {"OPERATOR": "operator_hold", "UNKNOWN": "device_error"}.get(
                result.termination, "interlock"
            )
            if result.termination == "OPERATOR" and context.cancel_requests.requested(claim.uid):
                cause = context.cancel_requests.cause(claim.uid)
            raise Cancel(
                f"{result.termination} termination: {result.reason or 'source retracted'}",
                percent,
                stored,
                cause=cause,
            )
        claim.stored = context.store_results(record_of(result.channels), "RO-24", claim.uid, 100.0)
        if outcome.flags:
            claim.description = "; ".join(outcome.flags)[:1024]
        return 100.0

    def _time_flags(self, channels: list[DeliveredChannel]) -> list[str]:
        """A channel that ended NORMAL with its measured time off its specified time by
        more than 0.1 s: recorded as measured, and said."""
        flags = []
        for channel in channels:
            off = channel.delivered_s - channel.specified_s
            if channel.termination == "NORMAL" and abs(off) > CHANNEL_TIME_TOLERANCE_S:
                flags.append(
                    f"channel {channel.channel_number} delivered {channel.delivered_s:g} s of "
                    f"the {channel.specified_s:g} s specified ({off:+.2f} s)"
                )
                self.context.metrics.fault("dwell_time")
        return flags

    def record(
        self, journal: dict, channels: list[DeliveredChannel], plan: Dataset, previous: list
    ) -> Dataset:
        session = BrachySession(
            study_instance_uid=journal["study_instance_uid"],
            machine=TreatmentMachine.identified(self.context.station, self.machine.identify()),
            fraction=int(journal["fraction"]),
            started=dt.datetime.fromisoformat(journal["session_start"]),
            source=self.machine.source(),
            delivery_type=journal["delivery_type"],
            previous_records=tuple(previous),
        )
        return build_brachy_treatment_record(plan, channels, self.context.uids, session)

    def after_restart(self, claim: Claim, outcome) -> Cancel | None:
        """The record of a treatment the process died in, from the dwells the journal
        holds (the machine retracted its source when its host went); None if nothing."""
        journaled = self.context.journal.work(claim.ups_uid)
        if journaled is None:
            return None
        journal, items = journaled
        channels = [_channel_from_json(item) for item in items]
        given = round(sum(c.delivered_s for c in channels), 4)
        if given <= 0:
            return None
        store = self.context.store
        plan = store.read(store.get(journal["plan_uid"]))
        previous = [store.read(store.get(u)) for u in journal["previous_record_uids"]]
        planned = float(journal["planned_s"])
        percent = round(given / planned * 100, 2) if planned else 0.0
        record = self.record(journal, channels, plan, previous)
        stored = self.context.store_results([record], "RO-24", claim.ups_uid, percent)
        outcome.delivered = {c.channel_number: c.delivered_s for c in channels}
        return Cancel(
            "the device restarted while treating; the record in the Output Information "
            f"holds the {given:g} s of source time delivered",
            percent,
            stored,
        )
