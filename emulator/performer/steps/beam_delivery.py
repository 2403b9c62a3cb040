"""The external-beam delivery step (RO-17 3.17.4.2 response 4; RO-24 stores its record):
the RT Plan's beams as the RT Beams Delivery Instruction asks, beam by beam on the
machine, and an RT Beams Treatment Record of exactly what the machine measured."""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset

from devices.base import BeamDeliverer, Positioner
from emulator.performer import safety
from emulator.performer.delivery import (
    BeamTask,
    SessionDelivery,
    beam_program,
    beam_tasks,
    reconcile_with_machine,
)
from emulator.performer.outbox import Claim, DeliveryContext
from emulator.performer.steps.base import Cancel, Step, StepInputs, Work
from emulator.performer.steps.session_state import SessionState
from emulator.results.treatment_record import (
    DeliveredBeam,
    TreatmentMachine,
    build_treatment_record,
)
from emulator.synth.brachy_access import is_brachy_plan
from emulator.ups_references import references_in


def _dt(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def _task_row(task: BeamTask) -> list:
    """A beam task as the journal keeps it: [beam number, start, end or None, type]."""
    program = task.program
    return [program.beam_number, program.start_meterset, program.end_meterset, task.delivery_type]


class BeamDeliveryStep(Step):
    """RO-24 for a linac: beams delivered, recorded, and flagged where off their plan."""

    name = "delivery"
    role = BeamDeliverer
    required_inputs = (
        ("rt_plan", "RT Plan"),
        ("rt_beams_delivery_instruction", "RT Beams Delivery Instruction"),
    )

    def read_inputs(self, ups: Dataset, inputs: StepInputs, session: SessionState) -> list[str]:
        uids = self.context.uids
        refs = references_in(ups.get("InputInformationSequence") or [])
        held = inputs.held
        plans = [held[r.sop_instance_uid] for r in refs if r.sop_class_uid == uids["rt_plan"]]
        instructions = [
            held[r.sop_instance_uid]
            for r in refs
            if r.sop_class_uid == uids["rt_beams_delivery_instruction"]
        ]
        if not plans or not instructions:
            return ["RO-18: the inputs hold no RT Plan and no RT Beams Delivery Instruction"]
        inputs.plan, inputs.instruction = plans[0], instructions[0]
        if is_brachy_plan(inputs.plan):
            return ["the RT Plan is a brachytherapy plan: an afterloader treats it, not a linac"]
        inputs.previous_records = [
            ds for ds in held.values() if ds.SOPClassUID == uids["rt_beams_treatment_record"]
        ]
        problems = safety.plan_problems(
            inputs.plan, inputs.instruction, ups, self.context.machine.capabilities()
        )
        if session.planning_ct:
            problems += safety.frame_problems(inputs.plan, session.planning_ct[0])
        return problems

    def start_marker(self, inputs: StepInputs) -> int | None:
        return int(inputs.instruction.BeamTaskSequence[0].ReferencedBeamNumber)

    def perform(self, work: Work) -> float:
        context, claim, outcome = self.context, work.claim, work.outcome
        plan, instruction, ups = work.inputs.plan, work.inputs.instruction, claim.ups
        tasks = beam_tasks(plan, instruction)
        planned = sum(t.program.stop_meterset - t.program.start_meterset for t in tasks)

        def share(delivery: SessionDelivery) -> float:
            """The fraction's meterset the machine has reported so far, in percent."""
            given = sum(beam.delivered for beam in delivery.so_far())
            return given / planned * 100 if planned else 0.0

        def beam_started(task: BeamTask) -> None:
            reason = context.cancel_requests.requested(claim.uid)
            if reason:  # asked between beams: no further beam is started
                raise Cancel(reason, cause=context.cancel_requests.cause(claim.uid))
            context.progress(claim, share(delivery), task.program.beam_number)
            if context.on_unit_start:
                context.on_unit_start(task)

        def delivered(delivery: SessionDelivery) -> None:
            context.journal.delivered(claim.uid, delivery.so_far())
            claim.reporter.offer(share(delivery))

        previous = work.inputs.previous_records
        delivery_context = DeliveryContext(
            plan_uid=str(plan.SOPInstanceUID),
            previous_record_uids=[str(ds.SOPInstanceUID) for ds in previous],
            study_instance_uid=str(ups.StudyInstanceUID),
            fraction=int(instruction.BeamTaskSequence[0].CurrentFractionNumber),
            session_start=_dt(dt.datetime.now().replace(microsecond=0)),
            planned_meterset=planned,
            tasks=[_task_row(t) for t in tasks],
        )
        context.journal.delivery_started(claim.uid, delivery_context)
        delivery = SessionDelivery(
            self.machine, tasks, context.on_event, beam_started, on_delivered=delivered
        )
        try:
            result = delivery.run()
        except Cancel as refused:
            # The TMS refused a progress update between beams (it no longer has the UPS IN
            # PROGRESS for this device): the beams already given are recorded all the same.
            beams = delivery.outcome.beams
            given = round(sum(b.delivered for b in beams), 4)
            refused.percent = round(given / planned * 100, 2) if planned else 0.0
            if beams:
                record = self.record(delivery_context, beams, plan, previous)
                refused.stored = context.store_results(
                    [record], "RO-24", claim.uid, refused.percent
                )
            outcome.delivered = {b.beam_number: b.delivered for b in beams}
            raise
        for beam in result.beams:
            context.metrics.beam(beam.termination, beam.delivered)
        outcome.flags = self.meterset_flags(tasks, result.beams)
        outcome.delivered = {beam.beam_number: beam.delivered for beam in result.beams}
        outcome.delivery_type = tasks[0].delivery_type if tasks else ""
        percent = round(result.delivered / planned * 100, 2) if planned else 0.0
        if result.interrupted:
            # RO-26: progress before the results are stored, then the record, then cancel.
            # Whatever any beam delivered is recorded, also when the device failed between
            # beams: the TMS and the next fraction must know that dose was given.
            context.progress(claim, percent, None)
            stored = []
            if result.beams:
                record = self.record(delivery_context, result.beams, plan, previous)
                stored = context.store_results([record], "RO-24", claim.uid, percent)
            if result.device_error:
                raise Cancel(result.reason, percent, stored, cause="device_error")
            cause = {"OPERATOR": "operator_hold", "UNKNOWN": "device_error"}.get(
                result.termination, "interlock"
            )
            if result.beams and result.beams[-1].termination_code == "LINK":
                cause = "device_error"  # the link to the controller, not an interlock
            elif result.termination == "OPERATOR" and context.cancel_requests.requested(claim.uid):
                cause = context.cancel_requests.cause(claim.uid)  # the hold was asked
            raise Cancel(
                f"{result.termination} termination: {result.reason or 'beam hold'}",
                percent,
                stored,
                cause=cause,
            )
        record = self.record(delivery_context, result.beams, plan, previous)
        claim.stored = context.store_results([record], "RO-24", claim.uid, percent)
        if outcome.flags:
            claim.description = "; ".join(outcome.flags)[:1024]
        return 100.0

    def meterset_flags(self, tasks: list[BeamTask], beams: list[DeliveredBeam]) -> list[str]:
        """Each beam that ended NORMAL with a measured meterset farther from its planned end
        than the machine's tolerance, in words; such a beam is marked NOT_VERIFIED (PS3.3
        C.8.8.21, RT Beams Session Record: Treatment Verification Status (3008,002C), "one
        or more values out of range and not overridden"), the words in its Treatment
        Termination Description (300A,0730), its record keeping what was measured."""
        tolerance = self.context.machine.capabilities().meterset_tolerance_mu
        by_number = {task.program.beam_number: task.program for task in tasks}
        flags = []
        for beam in beams:
            program = by_number.get(beam.beam_number)
            if program is None or beam.termination != "NORMAL":
                continue
            planned = program.stop_meterset - program.start_meterset
            off = beam.delivered - planned
            if abs(off) > tolerance:
                words = (
                    f"beam {beam.beam_number} delivered {beam.delivered:g} MU of the "
                    f"{planned:g} MU planned ({off:+.2f} MU, beyond the {tolerance:g} MU "
                    "tolerance)"
                )
                beam.verification = "NOT_VERIFIED"
                beam.termination_description = words
                self.context.metrics.fault("meterset")
                flags.append(f"{words}: the record says NOT_VERIFIED")
        return flags

    def record(
        self,
        delivery: DeliveryContext,
        beams: list[DeliveredBeam],
        plan: Dataset,
        previous: list[Dataset],
    ) -> Dataset:
        machine = self.context.machine
        if Positioner in machine.roles():  # the table top reached, as the couch said
            where = machine.couch_position()
            for beam in beams:
                beam.table_top = beam.table_top or where
        return build_treatment_record(
            plan,
            beams,
            self.context.uids,
            delivery.study_instance_uid,
            TreatmentMachine.identified(self.context.station, machine.identify()),
            delivery.fraction,
            dt.datetime.strptime(delivery.session_start, "%Y%m%d%H%M%S"),
            previous_records=previous,
        )

    def after_restart(self, claim: Claim, outcome) -> Cancel | None:
        """The record of a delivery the process died in, built from the beams the machine
        had reported and the journal holds; stored before the UPS is canceled with it, so
        the TMS schedules a continuation of exactly the rest. None if nothing was delivered.
        """
        context = self.context
        journaled = context.journal.delivery(claim.ups_uid)
        if journaled is None:
            return None
        delivery, beams = journaled
        store = context.store
        plan = store.read(store.get(delivery.plan_uid))
        journaled_beams = beams
        if beams:
            number, start, end, delivery_type = delivery.tasks[len(beams) - 1]
            last_task = BeamTask(beam_program(plan, number, start, end), delivery_type)
            beams = reconcile_with_machine(beams, last_task, context.machine.last_delivery())
        counted = "as the machine counted it" if beams is not journaled_beams else "as reported"
        given = round(sum(beam.delivered for beam in beams), 4)
        if given <= 0:
            return None
        previous = [store.read(store.get(u)) for u in delivery.previous_record_uids]
        record = self.record(delivery, beams, plan, previous)
        planned = delivery.planned_meterset
        percent = round(given / planned * 100, 2) if planned else 0.0
        stored = context.store_results([record], "RO-24", claim.ups_uid, percent)
        for beam in beams:
            context.metrics.beam(beam.termination, beam.delivered)
        outcome.delivered = {beam.beam_number: beam.delivered for beam in beams}
        return Cancel(
            "the device restarted while delivering; the record in the Output Information "
            f"holds the {given:g} MU delivered, {counted}",
            percent,
            stored,
        )
