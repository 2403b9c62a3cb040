"""Simulated linac and the delivery state machine: exact metersets, interruptions, pace."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace

import pytest

from devices.base import BeamEnded, DeviceError, MetersetTick
from devices.clock import Clock
from devices.registry import backends, open_device
from emulator.performer.delivery import SessionDelivery, beam_program, beam_tasks
from emulator.profile import load_sop_classes
from emulator.results.treatment_record import build_treatment_record
from emulator.synth import ContinuationRange, build_delivery_instruction
from tests.conftest import dciodvfy_errors


def _specified(plan) -> dict[int, float]:
    return {
        int(r.ReferencedBeamNumber): float(r.BeamMeterset)
        for r in plan.FractionGroupSequence[0].ReferencedBeamSequence
    }


def _tasks(patient, continuations=None, omitted=None):
    instruction = build_delivery_instruction(
        patient.context,
        patient.plan,
        load_sop_classes(),
        continuations=continuations,
        omitted_beams=omitted,
    )
    return beam_tasks(patient.plan, instruction)


def test_full_session_delivers_every_beam_exactly(patient):
    with open_device("sim", Clock(0)) as device:
        outcome = SessionDelivery(device, _tasks(patient)).run()
    specified = _specified(patient.plan)
    assert not outcome.interrupted
    assert [b.beam_number for b in outcome.beams] == [1, 2, 3]
    for beam in outcome.beams:
        assert beam.termination == "NORMAL"
        assert beam.delivered == pytest.approx(specified[beam.beam_number], abs=1e-3)
        program = beam_program(patient.plan, beam.beam_number)
        assert len(beam.control_points) == len(program.control_points) - 1
        assert sum(cp.specified_meterset for cp in beam.control_points) == pytest.approx(
            specified[beam.beam_number]
        )


def test_interlock_stops_at_the_exact_meterset(patient):
    with open_device("sim", Clock(0), {"interlocks": {2: 37.5}}) as device:
        session = SessionDelivery(device, _tasks(patient))
        outcome = session.run()
    assert outcome.interrupted and outcome.termination == "MACHINE"
    assert session.state == "session_done"
    assert [b.beam_number for b in outcome.beams] == [1, 2]  # beam 3 never started
    assert outcome.beams[1].delivered == pytest.approx(37.5)
    assert outcome.beams[1].termination == "MACHINE"


def test_operator_hold_never_reports_more_than_delivered(patient):
    seen: list[float] = []

    with open_device("sim", Clock(0)) as device:

        def on_event(task, event):
            if isinstance(event, MetersetTick):
                seen.append(event.meterset)
                if task.program.beam_number == 1 and event.meterset >= 20:
                    device.interrupt("patient moved")

        outcome = SessionDelivery(device, _tasks(patient), on_event).run()
    assert outcome.termination == "OPERATOR" and outcome.reason == "patient moved"
    assert outcome.beams[0].delivered == max(seen) == pytest.approx(20.0)


def test_continuation_delivers_exactly_the_remainder(patient):
    specified = _specified(patient.plan)
    with open_device("sim", Clock(0), {"interlocks": {2: 41.0}}) as device:
        first = SessionDelivery(device, _tasks(patient)).run()
    done = first.beams[1].delivered
    tasks = _tasks(
        patient,
        {2: ContinuationRange(done, specified[2])},
        {1: "delivered in full before the interruption"},
    )
    assert [t.program.beam_number for t in tasks] == [2, 3]
    assert tasks[0].delivery_type == "CONTINUATION"
    with open_device("sim", Clock(0)) as device:
        second = SessionDelivery(device, tasks).run()
    assert not second.interrupted
    assert done + second.beams[0].delivered == pytest.approx(specified[2], abs=1e-3)
    assert second.beams[1].delivered == pytest.approx(specified[3], abs=1e-3)


def test_time_scale_sets_the_pace(patient):
    """A beam takes its beam-on delay plus MU / dose rate, times the scale: never less (the
    machine cannot outrun its clock), and at scale 0.02 at most one machine tick more per
    control point (the pacing is against the beam's schedule, so lateness does not add up)."""
    program = beam_program(patient.plan, 1)
    scale = 0.02
    with open_device("sim", Clock(scale)) as device:
        timing = device.profile["timing"]
        device.load_beam(program)
        started = time.perf_counter()
        events = list(device.beam_on())
        elapsed = time.perf_counter() - started
    assert isinstance(events[-1], BeamEnded)
    meterset = program.stop_meterset - program.start_meterset
    machine_s = float(timing["beam_on_delay_s"]) + meterset / program.dose_rate * 60
    expected = machine_s * scale
    slack = len(program.control_points) * float(timing["tick_s"]) * scale
    # Plus one wake-up late by the OS on a loaded 2-core CI machine (measured under
    # pytest -n 2: up to ~0.1 s), since only the last sleep's lateness reaches the end.
    assert expected <= elapsed <= expected + slack + 0.25, (expected, elapsed)


def test_device_refuses_what_the_machine_cannot_do(patient):
    program = beam_program(patient.plan, 1)
    with open_device("sim", Clock(0)) as device:
        with pytest.raises(DeviceError, match="MV not available"):
            device.load_beam(replace(program, energy_mv=25.0))
        with pytest.raises(DeviceError, match="dose rate"):
            device.load_beam(replace(program, dose_rate=5000.0))


def test_registry_knows_sim_and_refuses_unknown_backends():
    assert "sim" in backends()
    with pytest.raises(ValueError, match="unknown device backend"):
        open_device("warp://drive", Clock(0))


def test_record_of_an_interrupted_delivery_passes_dciodvfy(patient, tmp_path):
    with open_device("sim", Clock(0), {"interlocks": {3: 12.3}}) as device:
        outcome = SessionDelivery(device, _tasks(patient)).run()
    record = build_treatment_record(
        patient.plan,
        outcome.beams,
        load_sop_classes(),
        patient.context.study_instance_uid,
        "TDW_LINAC1",
        1,
        dt.datetime.now(),
    )
    beams = {int(b.ReferencedBeamNumber): b for b in record.TreatmentSessionBeamSequence}
    assert beams[3].TreatmentTerminationStatus == "MACHINE"
    assert float(beams[3].DeliveredPrimaryMeterset) == pytest.approx(12.3)
    cps = beams[3].ControlPointDeliverySequence
    assert sum(float(cp.DeliveredMeterset) for cp in cps) == pytest.approx(12.3)
    # The interlock in the attributes PS3.3 keeps for it, not the retired Treatment
    # Termination Code (3008,002B).
    (code,) = beams[3].MachineSpecificTreatmentTerminationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("DOSE1", "99TDWEMU")
    assert beams[3].TreatmentTerminationDescription == code.CodeMeaning
    assert "TreatmentTerminationCode" not in beams[3]
    path = tmp_path / "record.dcm"
    record.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
