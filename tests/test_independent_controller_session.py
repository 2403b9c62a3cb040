"""The product against a controller written from hil/PROTOCOL.md alone (tests/peers/
controller, which imports nothing from the product): whole sessions, the fault list, and
the three cases a first independent controller found (a couch that stops short, an
overrun, control points numbered from 0).

The controller is the judge of what the machine did: its ``deliveries`` are what it
measured, and every record must hold exactly that, never more, never less.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from devices.base import MetersetTick
from emulator.seeding import SOAK_PATIENTS
from tests.conftest import REPO
from tests.peers.controller import IndependentController

PATIENT = SOAK_PATIENTS  # an 8-slice 64 x 64 CT, 4 beams of which 2 dynamic


@pytest.fixture
def controllers():
    """``make(site, **options)``: an independent controller imaging the site's seeded
    patient (its CT folder and RT Plan), serving TCP; returns its device URL."""
    made: list[IndependentController] = []

    def make(site, **options) -> str:
        patient = site.config.data_dir / "seed" / "patient_001"
        controller = IndependentController(anatomy=str(patient), **options)
        made.append(controller)
        host, port = controller.serve_tcp("127.0.0.1", 0)
        return f"tcp://{host}:{port}"

    make.made = made
    yield make
    for controller in made:
        controller.stop()


def _measured(controller: IndependentController) -> dict[int, float]:
    """Per beam, the meterset the controller measured over all its beam-ons."""
    total: dict[int, float] = {}
    for record in controller.deliveries:
        total[record.beam] = total.get(record.beam, 0.0) + record.measured - record.start
    return total


def _records(site) -> list:
    return [site.archive.store.read(i) for i in site.archive.store.select("modality = 'RTRECORD'")]


def test_a_pds_session_images_the_patient_and_treats_exactly(bench, controllers):
    _site, device = bench(
        lambda site: controllers(site, time_scale=0.05), kind="pds", seed_options=PATIENT
    )
    outcomes = device.run_once()
    (controller,) = controllers.made
    assert [o.state for o in outcomes] == ["COMPLETED"] * 4, [o.reason for o in outcomes]
    # The couch, driven by the registration of the controller's own CBCT, took out the
    # setup error it put the patient in: what is left is within TG-142's 1 mm.
    _rotation, translation = controller.patient_pose()
    assert max(abs(t) for t in translation) < 1.5, translation
    assert outcomes[-1].delivered == pytest.approx(_measured(controller))


@pytest.mark.timeout(600)
def test_a_whole_delivery_session_at_real_time(bench, controllers):
    """Time scale 1: the controller's beams take the time a linac takes."""
    two_beams = replace(PATIENT, beams=2, dynamic_beams=1)  # 45 s of make test, not 90
    site, device = bench(lambda site: controllers(site, time_scale=1.0), seed_options=two_beams)
    started = time.monotonic()
    (outcome,) = device.run_once()
    took = time.monotonic() - started
    (controller,) = controllers.made
    assert outcome.state == "COMPLETED", outcome.reason
    planned = sum(r.end - r.start for r in controller.deliveries)
    assert took > planned / 1400 * 60, f"{took:.0f} s for {planned:g} MU: not real time"
    assert outcome.delivered == pytest.approx(_measured(controller))
    (record,) = _records(site)
    assert {
        int(b.ReferencedBeamNumber): float(b.DeliveredPrimaryMeterset)
        for b in record.TreatmentSessionBeamSequence
    } == pytest.approx(_measured(controller))


def _at(device, beam: int, meterset: float, act) -> None:
    """Calls ``act()`` once, when beam ``beam`` has been reported past ``meterset``."""
    done = threading.Event()

    def on_event(task, event):
        past = isinstance(event, MetersetTick) and event.meterset >= meterset
        if task.program.beam_number == beam and past and not done.is_set():
            done.set()
            act()

    device.on_event = on_event


# A stall must outlast the 2 s a controller waits for a silent host with the beam still on
# (hil/PROTOCOL.md, Reliability): at time scale 0.5 a 100 MU beam takes 5 s.
SCALES = {"interlock": 0.05, "drop": 0.05, "stall": 0.5}


@pytest.mark.parametrize("fault", list(SCALES))
def test_the_fault_list_records_what_the_machine_measured(bench, controllers, fault):
    scale = SCALES[fault]
    site, device = bench(lambda site: controllers(site, time_scale=scale), seed_options=PATIENT)
    (controller,) = controllers.made
    if fault == "interlock":
        controller.trip_interlock(2, 40.0, code="DOOR")
    elif fault == "drop":
        _at(device, 2, 20.0, lambda: controller.drop_link(0.5))
    else:
        _at(device, 2, 20.0, lambda: controller.stall(4.0))
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED", outcome.reason
    measured = _measured(controller)
    assert outcome.delivered == pytest.approx(measured)
    assert 0 < measured[2] < 100
    (record,) = _records(site)
    beams = {int(b.ReferencedBeamNumber): b for b in record.TreatmentSessionBeamSequence}
    assert float(beams[2].DeliveredPrimaryMeterset) == pytest.approx(measured[2])
    assert beams[2].TreatmentTerminationStatus == "MACHINE"
    code = beams[2].MachineSpecificTreatmentTerminationCodeSequence[0].CodeValue
    assert code == {"interlock": "DOOR", "drop": "LINK", "stall": "LINK"}[fault]
    assert set(beams) == {1, 2}


@pytest.mark.parametrize(
    "fault", ["couch_stops_short", "swap_long_vert"], ids=["10 mm short", "axes swapped"]
)
def test_a_couch_off_the_correction_turns_no_beam_on(bench, controllers, fault):
    # A setup 12 mm off along the patient: the correction has a longitudinal part to miss.
    site, device = bench(
        lambda site: controllers(site, time_scale=0.05, setup_translation_mm=(3.0, -2.0, 12.0)),
        kind="pds",
        seed_options=PATIENT,
    )
    (controller,) = controllers.made
    if fault == "couch_stops_short":
        controller.couch_stops_short("longitudinal", 10.0)
    else:
        controller.swap_long_vert(True)
    by_step = {o.step: o for o in device.run_once()}
    assert by_step["registration"].state == "COMPLETED"
    adjustment = by_step["adjustment"]
    assert adjustment.state == "CANCELED"
    assert "couch longitudinal" in adjustment.reason, adjustment.reason
    assert "no beam may be turned on" in adjustment.reason
    assert controller.deliveries == []
    assert _records(site) == []
    delivery = next(
        w for w in site.tms.ups.select() if w.step == "delivery" and w.state == "CANCELED"
    )
    reason = delivery.dataset.ProcedureStepProgressInformationSequence[0].ReasonForCancellation
    assert "couch longitudinal" in reason


def test_an_overrun_is_recorded_as_measured_and_not_verified(bench, controllers):
    site, device = bench(lambda site: controllers(site, time_scale=0.05), seed_options=PATIENT)
    (controller,) = controllers.made
    controller.overrun(2.0)
    (outcome,) = device.run_once()
    measured = _measured(controller)
    assert outcome.delivered == pytest.approx(measured)
    assert all(value == pytest.approx(102.0, abs=0.1) for value in measured.values()), measured
    assert len(outcome.flags) == len(measured)
    (record,) = _records(site)
    for beam in record.TreatmentSessionBeamSequence:
        assert float(beam.DeliveredPrimaryMeterset) == pytest.approx(102.0, abs=0.1)
        assert beam.TreatmentVerificationStatus == "NOT_VERIFIED"
        assert int(beam.NumberOfControlPoints) == len(beam.ControlPointDeliverySequence)


def test_control_points_from_0_are_a_protocol_error_never_index_minus_1(bench, controllers):
    site, device = bench(lambda site: controllers(site, time_scale=0.05), seed_options=PATIENT)
    (controller,) = controllers.made
    controller.cp_index_from_zero(True)
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED"
    assert "CONTROL_POINT index 0" in outcome.reason, outcome.reason
    assert outcome.delivered == pytest.approx(_measured(controller))
    for record in _records(site):
        for beam in record.TreatmentSessionBeamSequence:
            code = beam.MachineSpecificTreatmentTerminationCodeSequence[0].CodeValue
            assert (beam.TreatmentTerminationStatus, code) == ("MACHINE", "PROTOCOL")
            indices = [
                int(cp.ReferencedControlPointIndex) for cp in beam.ControlPointDeliverySequence
            ]
            assert min(indices) >= 0, indices


def test_hil_check_passes_the_independent_controller(tmp_path):
    """Every clause `tdw-emu hil check` holds a controller to, a controller written from the
    document alone meets: the checks ask what the document says, no more."""
    with IndependentController(time_scale=0.05) as controller:
        host, port = controller.serve_tcp("127.0.0.1", 0)
        junit = tmp_path / "check.xml"
        result = subprocess.run(
            [sys.executable, "-m", "emulator.cli", "hil", "check",
             "--device", f"tcp://{host}:{port}", "--junit", str(junit)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 13
