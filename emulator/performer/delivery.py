"""Beam-by-beam delivery as a ``transitions`` state machine: session -> beam -> control point.

The state table is data (as pynetdicom keeps its DUL table): a beam is loaded, switched
on, and ends done or interrupted; an interrupted beam ends the session, because a
performing device that cannot deliver safely must stop and let the TMS schedule the rest.
What was delivered is taken only from the device's events, control point by control point.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pydicom.dataset import Dataset
from transitions import Machine

from devices.base import (
    BeamEnded,
    BeamProgram,
    ControlPointProgram,
    ControlPointReached,
    DeliveryEvent,
    Device,
    DeviceError,
    MachineDelivery,
    MetersetTick,
    Termination,
)
from emulator.results.treatment_record import DeliveredBeam, DeliveredControlPoint
from emulator.synth.plan_access import plan_beam, specified_metersets

STATES = ["idle", "beam_ready", "beam_on", "beam_done", "interrupted", "session_done"]
TRANSITIONS = [
    {"trigger": "load", "source": ["idle", "beam_done"], "dest": "beam_ready"},
    {"trigger": "start", "source": "beam_ready", "dest": "beam_on"},
    {"trigger": "complete", "source": "beam_on", "dest": "beam_done"},
    {"trigger": "halt", "source": "beam_on", "dest": "interrupted"},
    {"trigger": "finish", "source": ["idle", "beam_done"], "dest": "session_done"},
    {
        "trigger": "abandon",
        "source": ["idle", "beam_ready", "beam_done", "interrupted"],
        "dest": "session_done",
    },
]


@dataclass(frozen=True)
class BeamTask:
    """One beam to deliver in this session, as the RT Beams Delivery Instruction asks."""

    program: BeamProgram
    delivery_type: str = "TREATMENT"

    def fault_window(self) -> tuple[int, float, float]:
        """(beam number, first MU, last MU) this session gives it: where a fault may be
        armed (the soak's --fault-rate)."""
        return self.program.beam_number, self.program.start_meterset, self.program.stop_meterset


@dataclass
class SessionOutcome:
    beams: list[DeliveredBeam] = field(default_factory=list)
    interrupted: bool = False
    reason: str = ""
    termination: str = "NORMAL"
    # The device failed between beams (loading, axis verification): nothing was on, what
    # the earlier beams delivered stands.
    device_error: bool = False

    @property
    def delivered(self) -> float:
        return round(sum(b.delivered for b in self.beams), 4)


def _float(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    value = ds.get(keyword)
    return default if value in (None, "") else float(value)


def beam_program(
    plan: Dataset, beam_number: int, start: float = 0.0, end: float | None = None
) -> BeamProgram:
    """A plan beam as the machine executes it, with cumulative metersets in MU."""
    total = specified_metersets(plan)[beam_number]
    beam = plan_beam(plan, beam_number)
    final = float(beam.FinalCumulativeMetersetWeight)
    first = beam.ControlPointSequence[0]
    gantry = float(first.GantryAngle)
    collimator = _float(first, "BeamLimitingDeviceAngle", 0.0)
    jaws: dict[str, list[float]] = {}
    mlc: tuple[float, ...] = ()
    points = []
    for cp in beam.ControlPointSequence:
        gantry = _float(cp, "GantryAngle", gantry)
        for device in cp.get("BeamLimitingDevicePositionSequence", []):
            if device.RTBeamLimitingDeviceType.startswith("MLC"):
                mlc = tuple(float(v) for v in device.LeafJawPositions)
            else:
                jaws[device.RTBeamLimitingDeviceType] = [float(v) for v in device.LeafJawPositions]
        x = jaws.get("ASYMX", jaws.get("X", [0.0, 0.0]))
        y = jaws.get("ASYMY", jaws.get("Y", [0.0, 0.0]))
        points.append(
            ControlPointProgram(
                int(cp.ControlPointIndex),
                round(total * float(cp.CumulativeMetersetWeight) / final, 6),
                gantry,
                collimator,
                (x[0], x[1], y[0], y[1]),
                mlc,
            )
        )
    return BeamProgram(
        beam_number,
        str(beam.BeamName),
        float(first.NominalBeamEnergy),
        float(first.DoseRateSet),
        total,
        tuple(points),
        start,
        end,
    )


def beam_tasks(plan: Dataset, instruction: Dataset) -> list[BeamTask]:
    """The beams the instruction asks for, in its Beam Order Index, continuations resumed."""
    tasks = sorted(instruction.BeamTaskSequence, key=lambda t: int(t.get("BeamOrderIndex", 0) or 0))
    out = []
    for task in tasks:
        number = int(task.ReferencedBeamNumber)
        if task.TreatmentDeliveryType == "CONTINUATION":
            program = beam_program(
                plan,
                number,
                float(task.ContinuationStartMeterset),
                float(task.ContinuationEndMeterset),
            )
        else:
            program = beam_program(plan, number)
        out.append(BeamTask(program, str(task.TreatmentDeliveryType)))
    return out


@dataclass
class _BeamInProgress:
    """The beam on: what the machine has reported of it so far."""

    task: BeamTask
    cumulative: dict[int, float]
    points: list[DeliveredControlPoint] = field(default_factory=list)
    last_index: int = 0
    last_meterset: float = 0.0  # at the last control point reached
    meterset: float = 0.0  # the machine's latest report
    rate: float = 0.0

    def segment_in_progress(self) -> DeliveredControlPoint | None:
        """The part of the current segment delivered past the last control point (None past
        the final one: there is no segment there, see :meth:`as_delivered`)."""
        if self.meterset <= self.last_meterset + 1e-9 or self.last_index >= max(self.cumulative):
            return None
        program = self.task.program
        nxt = min(self.last_index + 1, max(self.cumulative))
        specified = self.cumulative[nxt] - max(
            self.cumulative.get(self.last_index, 0.0), program.start_meterset
        )
        return DeliveredControlPoint(
            self.last_index,
            specified,
            round(self.meterset - self.last_meterset, 4),
            program.dose_rate,
            self.rate,
            program.control_points[self.last_index].gantry_angle,
            dt.datetime.now().replace(microsecond=0),
        )

    def as_delivered(self, termination: str, code: str = "") -> DeliveredBeam:
        """The beam as measured: every control point reached, the segment in progress, and
        any meterset past the final control point counted in the last segment (a machine
        that overran: the record holds what it measured, and no control point the plan does
        not have)."""
        partial = self.segment_in_progress()
        points = self.points + ([partial] if partial else [])
        past_end = self.meterset - self.last_meterset
        if partial is None and points and past_end > 1e-9:
            points[-1] = replace(
                points[-1], delivered_meterset=round(points[-1].delivered_meterset + past_end, 4)
            )
        program = self.task.program
        return DeliveredBeam(
            program.beam_number, points, termination, self.task.delivery_type, termination_code=code
        )


def delivered_up_to(
    task: BeamTask, meterset: float, termination: str, code: str = ""
) -> DeliveredBeam:
    """A beam as delivered from its start to ``meterset``, control point by control point,
    when only the final count is known (the machine's, after the host lost the events)."""
    program = task.program
    cumulative = {cp.index: cp.cumulative_meterset for cp in program.control_points}
    points = []
    now = dt.datetime.now().replace(microsecond=0)
    for cp in program.control_points[1:]:
        begin = max(cumulative[cp.index - 1], program.start_meterset)
        end = cp.cumulative_meterset
        if end <= begin or meterset <= begin + 1e-9:
            continue
        delivered = round(min(meterset, end) - begin, 4)
        reached = meterset >= end - 1e-9
        gantry = cp.gantry_angle if reached else program.control_points[cp.index - 1].gantry_angle
        rate = program.dose_rate
        points.append(
            DeliveredControlPoint(cp.index - 1, end - begin, delivered, rate, rate, gantry, now)
        )
    past_end = meterset - program.control_points[-1].cumulative_meterset
    if points and past_end > 1e-9:  # counted past the final control point: the last segment
        points[-1] = replace(
            points[-1], delivered_meterset=round(points[-1].delivered_meterset + past_end, 4)
        )
    return DeliveredBeam(
        program.beam_number, points, termination, task.delivery_type, termination_code=code
    )


def reconcile_with_machine(
    beams: list[DeliveredBeam], last_task: BeamTask | None, report: MachineDelivery | None
) -> list[DeliveredBeam]:
    """The journaled beams, with the one the host died in completed by the machine's count.

    Only when the machine's last beam-on is that same one (same beam, same start) and it
    counted at least what the journal holds; otherwise the journal stands, which may be
    short by the frames in flight but never reports more than was delivered.
    """
    if not beams or last_task is None or report is None:
        return beams
    last = beams[-1]
    program = last_task.program
    same = (
        last.termination == "UNKNOWN"
        and report.beam_number == last.beam_number == program.beam_number
        and abs(report.start_meterset - program.start_meterset) < 1e-6
        and report.meterset >= program.start_meterset + last.delivered - 1e-6
    )
    if not same:
        return beams
    return [*beams[:-1], delivered_up_to(last_task, report.meterset, report.termination)]


class SessionDelivery:
    """Delivers beam tasks on one device; ``on_event`` sees every event (progress, UI).

    ``on_delivered`` is called whenever the machine reports more meterset, so the caller can
    journal :meth:`so_far` durably: if the process dies mid-beam, a restarted one builds the
    record from it instead of losing what was delivered.
    """

    def __init__(
        self,
        device: Device,
        tasks: list[BeamTask],
        on_event: Callable[[BeamTask, DeliveryEvent], None] | None = None,
        on_beam_start: Callable[[BeamTask], None] | None = None,
        on_delivered: Callable[[SessionDelivery], None] | None = None,
    ) -> None:
        self.device = device
        self.tasks = tasks
        self.on_event = on_event or (lambda task, event: None)
        self.on_beam_start = on_beam_start or (lambda task: None)
        self.on_delivered = on_delivered or (lambda delivery: None)
        self.outcome = SessionOutcome()
        self._current: _BeamInProgress | None = None
        self.machine = Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="idle",
            auto_transitions=False,
        )

    def run(self) -> SessionOutcome:
        """Delivers the tasks in order; stops at the first beam that does not end NORMAL, or
        at a device error between beams. Either way the outcome holds every beam delivered,
        so the record of what the machine gave is stored before the UPS is canceled."""
        outcome = self.outcome
        for task in self.tasks:
            try:
                self.device.load_beam(task.program)
                self._verify_axes(task)
            except DeviceError as exc:
                outcome.interrupted = outcome.device_error = True
                outcome.termination = Termination.MACHINE.value
                outcome.reason = f"device error before beam {task.program.beam_number}: {exc}"
                self.abandon()
                return outcome
            self.load()
            self.on_beam_start(task)
            self.start()
            delivered = self._deliver(task)
            outcome.beams.append(delivered)
            self._current = None
            self.on_delivered(self)
            if delivered.termination != Termination.NORMAL.value:
                self.halt()
                outcome.interrupted = True
                outcome.termination = delivered.termination
                outcome.reason = self._reason
                self.abandon()
                return outcome
            self.complete()
        self.finish()
        return outcome

    def _verify_axes(self, task: BeamTask) -> None:
        """Set and verify: the machine's own report must match where the beam starts
        (control point 0, or a continuation's last control point before its start)."""
        try:
            state = self.device.axes()
        except DeviceError:
            return  # a machine without axis reports (none of ours) cannot be verified
        problems = state.differences(task.program.start_point)
        if problems:
            raise DeviceError(f"beam {task.program.beam_number}: " + "; ".join(problems))

    def so_far(self) -> list[DeliveredBeam]:
        """Every beam delivered so far; the beam still on ends UNKNOWN where it stands."""
        current = [self._current.as_delivered("UNKNOWN")] if self._current else []
        return self.outcome.beams + current

    def _deliver(self, task: BeamTask) -> DeliveredBeam:
        program = task.program
        beam = _BeamInProgress(
            task,
            {cp.index: cp.cumulative_meterset for cp in program.control_points},
            last_meterset=program.start_meterset,
            meterset=program.start_meterset,
            rate=program.dose_rate,
        )
        self._current = beam
        self._reason = ""
        self._protocol_error = ""
        self.on_delivered(self)  # the beam is on before the machine's first report of it
        for event in self.device.beam_on():
            self.on_event(task, event)
            if isinstance(event, MetersetTick):
                beam.rate = event.dose_rate
                beam.meterset = max(beam.meterset, event.meterset)
            elif isinstance(event, ControlPointReached):
                cumulative = beam.cumulative
                if (
                    event.index < 1
                    or event.index not in cumulative
                    or event.index <= beam.last_index
                ):
                    # Never a control point the plan does not have (a firmware numbering from
                    # 0 made -1 of it): the beam is held, and ends MACHINE, code PROTOCOL.
                    self._protocol_error = (
                        f"control point {event.index} reported after {beam.last_index}"
                    )
                    self.device.interrupt(f"protocol error: {self._protocol_error}")
                    continue
                previous = max(cumulative.get(event.index - 1, 0.0), program.start_meterset)
                beam.points.append(
                    DeliveredControlPoint(
                        event.index - 1,
                        cumulative[event.index] - previous,
                        round(event.meterset - beam.last_meterset, 4),
                        program.dose_rate,
                        beam.rate,
                        event.gantry_angle,
                        dt.datetime.now().replace(microsecond=0),
                    )
                )
                beam.last_meterset = beam.meterset = event.meterset
                beam.last_index = event.index
            elif isinstance(event, BeamEnded):
                if self._protocol_error:
                    event = BeamEnded(
                        event.meterset,
                        Termination.MACHINE,
                        f"protocol error: {self._protocol_error}",
                        "PROTOCOL",
                    )
                code = event.interlock_code
                self._reason = f"{event.reason} ({code})" if code else event.reason
                if event.meterset > beam.meterset + 1e-6:
                    # The machine counted past what it reported (a link lost and found
                    # again): its count stands, control point by control point.
                    ended = delivered_up_to(task, event.meterset, event.termination.value, code)
                else:
                    # The segment the beam stopped in counts only what was delivered in it.
                    beam.meterset = event.meterset
                    ended = beam.as_delivered(event.termination.value, code)
                ended.termination_description = event.reason
                return ended
            else:
                continue
            self.on_delivered(self)
        raise RuntimeError("device ended beam_on without a BeamEnded event")
