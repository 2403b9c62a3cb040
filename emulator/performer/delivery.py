"""Beam-by-beam delivery as a ``transitions`` state machine: session -> beam -> control point.

The state table is data (as pynetdicom keeps its DUL table): a beam is loaded, switched
on, and ends done or interrupted; an interrupted beam ends the session, because a
performing device that cannot deliver safely must stop and let the TMS schedule the rest.
What was delivered is taken only from the device's events, control point by control point.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class SessionOutcome:
    beams: list[DeliveredBeam] = field(default_factory=list)
    interrupted: bool = False
    reason: str = ""
    termination: str = "NORMAL"

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


class SessionDelivery:
    """Delivers beam tasks on one device; ``on_event`` sees every event (progress, UI)."""

    def __init__(
        self,
        device: Device,
        tasks: list[BeamTask],
        on_event: Callable[[BeamTask, DeliveryEvent], None] | None = None,
        on_beam_start: Callable[[BeamTask], None] | None = None,
    ) -> None:
        self.device = device
        self.tasks = tasks
        self.on_event = on_event or (lambda task, event: None)
        self.on_beam_start = on_beam_start or (lambda task: None)
        self.machine = Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="idle",
            auto_transitions=False,
        )

    def run(self) -> SessionOutcome:
        outcome = SessionOutcome()
        for task in self.tasks:
            self.device.load_beam(task.program)
            self._verify_axes(task)
            self.load()
            self.on_beam_start(task)
            self.start()
            delivered = self._deliver(task)
            outcome.beams.append(delivered)
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
        """Set and verify: the machine's own report must match control point 0."""
        try:
            state = self.device.axes()
        except DeviceError:
            return  # a machine without axis reports (none of ours) cannot be verified
        problems = state.differences(task.program.control_points[0])
        if problems:
            raise DeviceError(f"beam {task.program.beam_number}: " + "; ".join(problems))

    def _deliver(self, task: BeamTask) -> DeliveredBeam:
        program = task.program
        cumulative = {cp.index: cp.cumulative_meterset for cp in program.control_points}
        dose_rate = program.dose_rate
        last_meterset = program.start_meterset
        last_index = 0
        rate = dose_rate
        points: list[DeliveredControlPoint] = []
        self._reason = ""
        for event in self.device.beam_on():
            self.on_event(task, event)
            if isinstance(event, MetersetTick):
                rate = event.dose_rate
            elif isinstance(event, ControlPointReached):
                previous = max(cumulative.get(event.index - 1, 0.0), program.start_meterset)
                points.append(
                    DeliveredControlPoint(
                        event.index - 1,
                        cumulative[event.index] - previous,
                        round(event.meterset - last_meterset, 4),
                        dose_rate,
                        rate,
                        event.gantry_angle,
                        dt.datetime.now().replace(microsecond=0),
                    )
                )
                last_meterset, last_index = event.meterset, event.index
            elif isinstance(event, BeamEnded):
                if event.meterset > last_meterset + 1e-9:
                    # The segment the beam stopped in: only what was delivered in it.
                    nxt = min(last_index + 1, max(cumulative))
                    specified = cumulative[nxt] - max(
                        cumulative.get(last_index, 0.0), program.start_meterset
                    )
                    gantry = program.control_points[last_index].gantry_angle
                    points.append(
                        DeliveredControlPoint(
                            last_index,
                            specified,
                            round(event.meterset - last_meterset, 4),
                            dose_rate,
                            rate,
                            gantry,
                            dt.datetime.now().replace(microsecond=0),
                        )
                    )
                self._reason = event.reason
                return DeliveredBeam(
                    program.beam_number, points, event.termination.value, task.delivery_type
                )
        raise RuntimeError("device ended beam_on without a BeamEnded event")
