"""One workflow, three backends (sim, serial over a real pty, TCP), and the fault matrix."""

from __future__ import annotations

import threading
import time

import pytest

from devices.base import MetersetTick
from devices.couch_axes import to_patient
from devices.geometry import rigid_parameters
from emulator.reference.site import ReferenceSite
from emulator.seeding import SeedOptions
from hil.faults import send_fault
from tests.conftest import free_port
from tests.hil_bench import start_controller

BENCH_PHANTOM = SeedOptions(beams=3, dynamic_beams=1, control_points=8)


def record_summary(site: ReferenceSite) -> list[tuple]:
    record = site.archive.store.read(site.archive.store.select("modality = 'RTRECORD'")[0])
    return [
        (
            int(b.ReferencedBeamNumber),
            str(b.TreatmentTerminationStatus),
            int(b.NumberOfControlPoints),
            round(float(b.DeliveredPrimaryMeterset), 3),
            tuple(round(float(cp.DeliveredMeterset), 3) for cp in b.ControlPointDeliverySequence),
        )
        for b in record.TreatmentSessionBeamSequence
    ]


def test_one_workflow_three_backends_same_records(bench):
    summaries = {}
    for kind in ("sim", "serial", "tcp"):
        spec = "sim" if kind == "sim" else start_controller(kind)[0]
        site, device = bench(spec)
        (outcome,) = device.run_once()
        assert outcome.state == "COMPLETED", (kind, outcome.reason)
        summaries[kind] = record_summary(site)
    assert summaries["sim"] == summaries["serial"] == summaries["tcp"]
    assert [s[3] for s in summaries["tcp"]] == [100.0, 100.0, 100.0]


@pytest.mark.parametrize("kind", ["serial", "tcp"])
def test_interlock_from_the_control_channel(bench, kind):
    spec, sim, control = start_controller(kind)
    assert send_fault(control, {"fault": "interlock", "beam": 2, "meterset": 40})["ok"]
    _site, device = bench(spec)
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "MACHINE" in outcome.reason
    assert "dosimetry interlock" in outcome.reason
    assert outcome.delivered == {1: 100.0, 2: 40.0}
    assert all(outcome.delivered[b] <= sim.acknowledged[b] + 1e-9 for b in outcome.delivered)


@pytest.mark.parametrize("kind", ["serial", "tcp"])
def test_garbled_frames_are_retried_and_the_delivery_is_exact(bench, kind):
    spec, sim, control = start_controller(kind)
    send_fault(control, {"fault": "garble", "rate": 0.15})
    send_fault(control, {"fault": "duplicate", "rate": 0.1})
    _site, device = bench(spec)
    (outcome,) = device.run_once()
    assert outcome.state == "COMPLETED", outcome.reason
    assert outcome.delivered == {1: 100.0, 2: 100.0, 3: 100.0}
    assert outcome.delivered == sim.acknowledged
    assert sim.faults.counters.get("garbled", 0) > 0
    assert sim.faults.counters.get("duplicated", 0) > 0
    # The host saw them: garbled frames dropped by their check, duplicates acknowledged
    # again but delivered once (or the delivery above would count a beam twice).
    counters = device.device.link.counters
    assert counters.garbled > 0 and counters.duplicates > 0, counters


@pytest.mark.parametrize(
    ("kind", "fault"),
    [
        ("tcp", {"fault": "drop"}),
        ("tcp", {"fault": "stall", "seconds": 4}),
        ("serial", {"fault": "unplug", "seconds": 4}),
    ],
)
def test_link_lost_mid_beam_ends_machine_at_the_last_reported_meterset(bench, kind, fault):
    spec, sim, control = start_controller(kind, time_scale=0.2)
    site, device = bench(spec)
    reported: list[float] = []
    injected = threading.Event()

    def on_event(task, event):
        if isinstance(event, MetersetTick):
            reported.append(event.meterset)
            if task.program.beam_number == 1 and event.meterset >= 20 and not injected.is_set():
                injected.set()
                send_fault(control, fault)

    device.on_event = on_event
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "link lost" in outcome.reason
    # The host reconnected and took the controller's own count of that beam-on: never less
    # than it heard, never more than the machine measured, and exactly the machine's count.
    (beam_on,) = [d for d in sim.deliveries if d["beam"] == 1]
    assert outcome.delivered[1] >= max(reported) - 1e-9
    assert outcome.delivered[1] == pytest.approx(beam_on["measured"])
    assert "the controller counted" in outcome.reason
    assert outcome.delivered[1] < 100
    # The record the Archive holds ends that beam as MACHINE (RT Beams Treatment Record,
    # PS3.3 C.8.8.21: the machine, not the operator or the plan, ended it).
    (record_uid,) = outcome.stored
    record = site.archive.store.read(site.archive.store.get(record_uid))
    beams = {int(b.ReferencedBeamNumber): b for b in record.TreatmentSessionBeamSequence}
    assert beams[1].TreatmentTerminationStatus == "MACHINE"
    assert float(beams[1].DeliveredPrimaryMeterset) == pytest.approx(beam_on["measured"])
    time.sleep(4.5 if fault["fault"] != "drop" else 0.2)
    send_fault(control, {"fault": "clear"})
    # The driver reconnects: the continuation the TMS scheduled is delivered to the end.
    device.on_event = None
    (again,) = device.run_once()
    assert again.state == "COMPLETED", again.reason
    assert again.delivered[1] + outcome.delivered[1] == pytest.approx(100.0)
    assert device.device.reconnects >= 1


@pytest.mark.parametrize("where", [["--tcp", "127.0.0.1:0"], ["--serial", "auto"]])
def test_controller_sim_command(where, archive_process_factory):
    from devices.base import BeamEnded
    from devices.clock import Clock
    from devices.registry import open_device
    from emulator.performer.delivery import beam_program
    from emulator.synth import generate_patient
    from tests.conftest import SMALL_GEOMETRY

    proc = archive_process_factory(
        *where, "--time-scale", "0", command="hil controller-sim", ready="controller listening on"
    )
    line = next(out for out in proc.output if "controller listening on" in out)
    spec = line.split("listening on ")[1].strip()
    control = next(out for out in proc.output if "control channel on" in out).split(" on ")[1]
    host, port = control.rsplit(":", 1)
    assert send_fault((host, int(port)), {"fault": "status"})["ok"]
    plan = generate_patient(geometry=SMALL_GEOMETRY).plan
    with open_device(spec, Clock(0)) as device:
        assert device.identify().model == "SimLinac C-arm"
        device.load_beam(beam_program(plan, 1))
        events = list(device.beam_on())
    assert isinstance(events[-1], BeamEnded), events
    assert events[-1].meterset == pytest.approx(100.0), events


@pytest.mark.parametrize(
    "fault", [{"fault": "reorder", "rate": 0.2}, {"fault": "latency", "ms": 5, "jitter_ms": 20}]
)
def test_reordered_and_delayed_frames_still_deliver_exactly(bench, fault):
    spec, sim, control = start_controller("tcp")
    assert send_fault(control, fault)["ok"]
    _site, device = bench(spec)
    (outcome,) = device.run_once()
    assert outcome.state == "COMPLETED", outcome.reason
    assert outcome.delivered == {1: 100.0, 2: 100.0, 3: 100.0}
    if fault["fault"] == "reorder":
        assert sim.faults.counters.get("reordered", 0) > 0


def test_spy_url_logs_the_traffic_of_a_serial_session(tmp_path):
    from devices.base import BeamEnded
    from devices.clock import Clock
    from devices.registry import open_device
    from emulator.performer.delivery import beam_program
    from emulator.synth import generate_patient
    from tests.conftest import SMALL_GEOMETRY

    spec, _, _ = start_controller("serial")
    log = tmp_path / "spy.txt"
    path = spec.removeprefix("serial://")
    plan = generate_patient(geometry=SMALL_GEOMETRY).plan
    with open_device(f"serial:spy://{path}?file={log}", Clock(0)) as device:
        device.load_beam(beam_program(plan, 1))
        assert isinstance(list(device.beam_on())[-1], BeamEnded)
    assert log.stat().st_size > 0  # pyserial's spy:// wrote the exchange


def test_third_party_backends_register_by_name():
    from devices.clock import Clock
    from devices.registry import backends, open_device, register
    from devices.sim.linac import SimulatedLinac, load_machine_profile

    made = []

    def factory(rest, clock, options):
        made.append(rest)
        return SimulatedLinac(load_machine_profile("linac"), clock)

    register("vendorx", factory)
    assert "vendorx" in backends()
    with open_device("vendorx:bench-7", Clock(0)) as device:
        assert device.identify().model == "SimLinac C-arm"
    assert made == ["bench-7"]


def test_pds_over_tcp_images_moves_the_couch_and_verifies_axes(bench):
    """Imaging, couch moves and axis reports cross the link too, not only beams."""
    spec, sim, _ = start_controller("tcp")
    # A bench rig images its phantom: the planning CT is that phantom's (default geometry).
    _site, device = bench(spec, kind="pds", seed_options=BENCH_PHANTOM)
    setup = sim.linac.imager.pose.copy()
    outcomes = device.run_once()
    state = device.device.axes()
    assert [o.state for o in outcomes] == ["COMPLETED"] * 4
    slices = sim.linac.profile["imaging"]["CBCT"]["slices"]
    assert len(outcomes[0].stored) == slices  # CBCT slices that crossed the link as IMAGES
    # Every axis was off before; the couch, driven over the link, corrected all six to
    # AAPM TG-142's stereotactic tolerances (1 mm, and 0.5 degree for couch rotation).
    translation, rotation = rigid_parameters(setup)
    assert min(abs(t) for t in translation) >= 1.0 and min(abs(r) for r in rotation) >= 0.5
    left_translation, left_rotation = rigid_parameters(sim.linac.imager.pose)
    assert max(abs(t) for t in left_translation) < 1.0, left_translation
    assert max(abs(r) for r in left_rotation) < 0.5, left_rotation
    # The table top (IEC 61217 axes: HFS lateral x, longitudinal z, vertical -y) moved by
    # the correction, and the host read back exactly where the couch said it went.
    moved, _turned = to_patient(sim.linac.couch, "HFS")
    assert moved == pytest.approx([-t for t in translation], abs=1.0)
    assert device.device.couch_position() == sim.linac.couch == state.couch
    assert state.gantry_angle == sim.linac.axes().gantry_angle


def test_axes_that_do_not_reach_control_point_0_stop_the_beam(patient):
    from devices.clock import Clock
    from devices.registry import open_device
    from emulator.performer.delivery import BeamTask, SessionDelivery, beam_program

    program = beam_program(patient.plan, 1)
    faulty = open_device("sim", Clock(0), {"axis_faults": {"gantry": 5.0}})
    with faulty as device:
        outcome = SessionDelivery(device, [BeamTask(program)]).run()
    # Nothing was switched on: the session ends on the device error, with no beam at all.
    assert outcome.interrupted and outcome.device_error
    assert "gantry at" in outcome.reason
    assert outcome.beams == [] and outcome.delivered == 0


def test_stuck_axis_over_the_link_cancels_before_any_meterset(bench):
    spec, _sim, control = start_controller("tcp")
    assert send_fault(control, {"fault": "stuck_axis", "axis": "gantry", "short_by": 3})["ok"]
    _site, device = bench(spec)
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "gantry at" in outcome.reason
    assert outcome.delivered == {}


@pytest.mark.parametrize("kind", ["serial", "tcp"])
def test_operator_hold_over_the_link(bench, kind):
    # At time scale 0.2 a 100 MU beam lasts 2 s: the hold asked at 30 MU lands mid-beam
    # even on a loaded machine (at 0.02 it had 0.14 s, and once came after the beam ended).
    spec, sim, _ = start_controller(kind, time_scale=0.2)
    _site, device = bench(spec)
    seen: list[float] = []

    def hold(task, event):
        second_beam = task.program.beam_number == 2
        if isinstance(event, MetersetTick) and second_beam and not seen and event.meterset >= 30:
            seen.append(event.meterset)
            device.device.interrupt("operator: patient coughing")

    device.on_event = hold
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED" and "OPERATOR" in outcome.reason
    assert outcome.delivered[1] == 100.0
    # The machine's own log of that beam-on (its ground truth, not the host's view): it
    # ended on the operator's hold, after the tick the host acted on, and the record holds
    # exactly what the machine measured: not a tick more, not a tick less.
    [machine] = [d for d in sim.deliveries if d["beam"] == 2]
    assert machine["termination"] == "OPERATOR"
    assert seen[0] <= machine["measured"] < 100.0
    assert outcome.delivered[2] == machine["measured"]


def test_a_count_the_controller_cannot_confirm_ends_unknown_and_needs_review(bench):
    """The controller stalls with the beam on and stays silent past the host's reconnect
    window: the beam ends UNKNOWN at the last meterset heard, the record says so, and the
    TMS schedules no continuation by itself (it could deliver the unheard part twice)."""
    spec, _sim, control = start_controller("tcp", time_scale=0.2)
    site, device = bench(f"{spec}?reconnect_s=1.5&hello_s=0.5")
    reported: list[float] = []

    def on_event(task, event):
        if isinstance(event, MetersetTick):
            reported.append(event.meterset)
            if task.program.beam_number == 1 and event.meterset >= 20 and len(reported) < 1000:
                reported.extend([event.meterset] * 1000)  # only once
                send_fault(control, {"fault": "stall", "seconds": 15})

    device.on_event = on_event
    (outcome,) = device.run_once()
    send_fault(control, {"fault": "clear"})
    assert outcome.state == "CANCELED"
    assert "could not be confirmed" in outcome.reason
    assert outcome.delivered[1] == pytest.approx(max(reported))
    record = site.archive.store.read(site.archive.store.get(outcome.stored[0]))
    (beam,) = record.TreatmentSessionBeamSequence
    assert beam.TreatmentTerminationStatus == "UNKNOWN"
    assert site.tms.continuations == []
    (session,) = site.tms.ups.sessions()
    assert "needs review" in session.note and "UNKNOWN" in session.note


def test_start_up_failures_are_one_sentence_each(tmp_path):
    """A controller that is not there, a port that is taken, a serial device that does not
    exist: one line naming the cause, no traceback, and `run` still writes its report."""
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "emulator.cli", *args],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = cli("hil", "controller-sim", "--tcp", f"127.0.0.1:{port}")
    assert busy.returncode == 2 and "cannot open 127.0.0.1:" in busy.stderr
    missing = cli("hil", "controller-sim", "--serial", str(tmp_path / "no-such-tty"))
    assert missing.returncode == 2 and "cannot open" in missing.stderr
    nobody = free_port()
    run = cli(
        "run", "--kind", "tdd", "--station", "LINAC1", "--tms", "TMS@127.0.0.1:1",
        "--archive", "ARCHIVE@127.0.0.1:2", "--listen-port", str(free_port()),
        "--device", f"tcp://127.0.0.1:{nobody}?reconnect_s=1",
        "--report-dir", str(tmp_path / "report"), "--data-dir", str(tmp_path / "dev"),
    )  # fmt: skip
    assert run.returncode == 1
    assert "cannot open the controller link" in run.stderr
    assert (tmp_path / "report" / "run-report.json").is_file()
    for result in (busy, missing, run):
        assert "Traceback" not in result.stdout + result.stderr


def test_serial_settings_and_timing_ride_in_the_device_url():
    from devices.remote import DeviceUrl, link_opener

    url = DeviceUrl.parse("/dev/ttyUSB0?baudrate=57600&parity=E&rtscts=1&stopbits=2&silence_s=9")
    assert url.target == "/dev/ttyUSB0"
    assert url.serial == {"baudrate": 57600, "parity": "E", "rtscts": True, "stopbits": 2.0}
    assert url.timing == {"silence_s": 9.0}
    with pytest.raises(ValueError, match="parity"):
        DeviceUrl.parse("/dev/ttyUSB0?parity=X")
    opener, _ = link_opener("serial:loop://?baudrate=57600&parity=E&bytesize=7")
    transport = opener()
    try:
        port = transport.port
        assert (port.baudrate, port.parity, port.bytesize) == (57600, "E", 7)
    finally:
        transport.close()


def test_pyserial_socket_url_drives_a_session(bench):
    """pyserial's socket:// handler, the way a serial-over-TCP bridge is reached."""
    spec, _sim, _ = start_controller("tcp")
    _site, device = bench(spec.replace("tcp://", "socket://"))
    (outcome,) = device.run_once()
    assert outcome.state == "COMPLETED", outcome.reason
