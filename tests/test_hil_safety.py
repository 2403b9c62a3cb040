"""A real machine refuses to treat when the couch or the meterset is off, and a host must
not record what the plan does not have: hil/PROTOCOL.md, Safety, held against the
controller simulator over real sockets and ptys.

- The simulator images the patient the host treats (the planning CT goes through its
  control channel, `?control=HOST:PORT`), so a HIL session completes for a patient other
  than the bench phantom; without it the registration cancels in one sentence that says
  why.
- A couch that stops 10 mm short: no beam, the adjustment CANCELED naming the couch, the
  session's delivery CANCELED by the TMS with that reason.
- A machine that delivers 102 MU of 100: the record says 102 and NOT_VERIFIED, the run
  prints a problem, a metric counts it, the TMS holds it in the UPS.
- CONTROL_POINT numbered from 0: a protocol error, the beam held; never index -1.
- A version-1 controller: refused in one sentence.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from emulator.reference.ups_store import UpsStore
from emulator.seeding import SOAK_PATIENTS
from hil.faults import send_fault
from tests.conftest import REPO, dciodvfy_errors, free_port, start_cli_process
from tests.hil_bench import controller_process, start_controller, with_control
from tests.kill_harness import cancel_reason, run_command, start_site
from tests.peers.controller.framing import FrameSplitter, decode_frame, encode_frame

# The patient the independent strict TMS of the report had: an 8-slice 64 x 64 CT, not the
# bench phantom (40 slices of 128 x 128) the simulator images when nobody tells it.
PATIENT = replace(SOAK_PATIENTS, beams=2, dynamic_beams=1)


def _outcomes(report_dir: Path) -> list[dict]:
    return json.loads((report_dir / "run-report.json").read_text())["outcomes"]


def _workitems(site_dir: Path) -> dict[str, object]:
    store = UpsStore(site_dir / "tms" / "ups.sqlite3")
    try:
        return {record.step: record for record in store.select()}
    finally:
        store.close()


@pytest.mark.timeout(600)
def test_a_pds_session_over_tcp_for_a_patient_other_than_the_bench_phantom(tmp_path):
    """Acceptance: TCP, time scale 0.1, `tdw-emu tms` in its own process, the small patient."""
    controller, device = controller_process("--tcp", "127.0.0.1:0", "--time-scale", "0.1")
    port = free_port()
    site = start_site(tmp_path / "site", port, 1, "--seed-size", "small")
    report = tmp_path / "report"
    try:
        result = subprocess.run(
            run_command(site, port, tmp_path / "device", "--device", device,
                        "--report-dir", str(report)),
            cwd=REPO, capture_output=True, text=True, timeout=500,
        )  # fmt: skip
    finally:
        site.stop()
        controller.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [(o["step"], o["state"]) for o in _outcomes(report)] == [
        ("acquisition", "COMPLETED"),
        ("registration", "COMPLETED"),
        ("adjustment", "COMPLETED"),
        ("delivery", "COMPLETED"),
    ]
    assert {w.state for w in _workitems(tmp_path / "site").values()} == {"COMPLETED"}


def test_without_the_patient_the_registration_cancels_saying_why(bench):
    """The simulator not told who lies on the couch images its bench phantom: the host
    cannot register that against the patient's CT, and says so in one sentence."""
    spec, _sim, _control = start_controller("tcp")
    _site, device = bench(spec, kind="pds", seed_options=PATIENT)
    outcomes = device.run_once()
    by_step = {o.step: o for o in outcomes}
    assert by_step["acquisition"].state == "COMPLETED"
    registration = by_step["registration"]
    assert registration.state == "CANCELED"
    assert "the CBCT does not match the planning CT" in registration.reason, registration
    assert "is the patient imaged the patient planned?" in registration.reason


def test_the_simulator_images_the_patient_it_is_told_of(bench):
    """In process and over the link alike: the patient's CT goes to the simulator's control
    channel, its CBCT registers, and the couch corrects the setup error."""
    spec, sim, control = start_controller("tcp")
    _site, device = bench(with_control(spec, control), kind="pds", seed_options=PATIENT)
    outcomes = device.run_once()
    assert [o.state for o in outcomes] == ["COMPLETED"] * 4, [o.reason for o in outcomes]
    assert sim.linac.imager.anatomy is not None
    assert sim.linac.imager.anatomy.hu.shape == (PATIENT.slices, PATIENT.rows, PATIENT.rows)


def _machine_with_setup_error(tmp_path: Path, longitudinal_mm: float) -> Path:
    """The reference linac, its patient lying ``longitudinal_mm`` off along z (HFS: the
    table top's longitudinal axis), as setups 1 cm off are in clinics."""
    profile = yaml.safe_load((REPO / "profiles" / "machines" / "linac.yaml").read_text())
    profile["imaging"]["setup_error_mm"] = [3.0, -2.0, longitudinal_mm]
    path = tmp_path / "linac-12mm.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def test_a_couch_10_mm_short_turns_no_beam_on(bench, tmp_path):
    machine = _machine_with_setup_error(tmp_path, 12.0)
    spec, sim, control = start_controller("tcp", machine=str(machine))
    reply = send_fault(control, {"fault": "couch_short", "axis": "longitudinal_mm", "by": 10})
    assert reply["ok"], reply
    site, device = bench(with_control(spec, control), kind="pds", seed_options=PATIENT)
    outcomes = device.run_once()
    by_step = {o.step: o for o in outcomes}
    assert by_step["registration"].state == "COMPLETED"
    adjustment = by_step["adjustment"]
    assert adjustment.state == "CANCELED"
    # Asked for about 12 mm, the couch went 2, then nothing of the 10 mm rest it was asked
    # for once more: 10 mm short, beyond TG-142's 1 mm.
    assert "couch longitudinal" in adjustment.reason and "10.0 mm short" in adjustment.reason
    assert "no beam may be turned on" in adjustment.reason
    # No beam was turned on: the machine's own log has none, the Archive no record.
    assert sim.deliveries == []
    assert site.archive.store.select("modality = 'RTRECORD'") == []
    everything = site.tms.ups.select()
    session = next(
        w.session_id for w in everything if w.sop_instance_uid == adjustment.sop_instance_uid
    )
    workitems = {w.step: w for w in everything if w.session_id == session}
    assert workitems["adjustment"].state == "CANCELED"
    code = workitems["adjustment"].dataset.ProcedureStepProgressInformationSequence[0]
    (reason,) = code.ProcedureStepDiscontinuationReasonCodeSequence
    assert (reason.CodeValue, reason.CodingSchemeDesignator) == ("110501", "DCM")
    # The TMS canceled the session's delivery, naming the couch.
    assert workitems["delivery"].state == "CANCELED"
    assert "couch longitudinal" in cancel_reason(workitems["delivery"])


@pytest.mark.timeout(300)
def test_a_2_mu_overrun_is_recorded_as_measured_and_flagged(tmp_path):
    """TDD on the controller simulator (own process), `tdw-emu tms` in its own: the run
    prints the problem and exits 1, the record holds 102 MU NOT_VERIFIED and no control
    point the plan lacks, and the TMS holds the words in the UPS."""
    controller, device = controller_process("--tcp", "127.0.0.1:0", "--time-scale", "0.05")
    host, control_port = device.rsplit("control=", 1)[1].rsplit(":", 1)
    send_fault((host, int(control_port)), {"fault": "overrun", "mu": 2, "beam": 1})
    port = free_port()
    site = start_cli_process(
        "tms", "--data-dir", str(tmp_path / "site"), "--port", "0", "--archive-port", "0",
        "--peer", f"TDD1@127.0.0.1:{port}", "--seed", "LINAC1", "--seed-size", "small",
        ready="ready",
    )  # fmt: skip
    tms_host, tms_port = site.addresses["TMS"]
    archive_host, archive_port = site.addresses["ARCHIVE"]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "emulator.cli", "run", "--kind", "tdd", "--station", "LINAC1",
             "--ae-title", "TDD1", "--tms", f"TMS@{tms_host}:{tms_port}",
             "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
             "--listen-port", str(port), "--data-dir", str(tmp_path / "device"),
             "--device", device, "--report-dir", str(tmp_path / "report")],
            cwd=REPO, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        site.stop()
        controller.stop()
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed[-3000:]
    problems = [line for line in printed.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1, printed[-3000:]
    assert "beam 1 delivered 102 MU of the 100 MU planned" in problems[0]
    assert "NOT_VERIFIED" in problems[0]
    delivery = _workitems(tmp_path / "site")["delivery"]
    assert delivery.state == "COMPLETED"
    progress = delivery.dataset.ProcedureStepProgressInformationSequence[0]
    assert "beam 1 delivered 102 MU" in progress.ProcedureStepProgressDescription
    stored = {path: dcmread(path, stop_before_pixels=True) for path in
              (tmp_path / "site").rglob("*") if path.is_file() and _is_dicom(path)}  # fmt: skip
    ((record_path, record),) = [(p, d) for p, d in stored.items() if d.Modality == "RTRECORD"]
    plan = next(d for d in stored.values() if d.Modality == "RTPLAN")
    beams = {int(b.ReferencedBeamNumber): b for b in record.TreatmentSessionBeamSequence}
    assert float(beams[1].DeliveredPrimaryMeterset) == pytest.approx(102.0)
    assert beams[1].TreatmentVerificationStatus == "NOT_VERIFIED"
    assert beams[1].TreatmentTerminationStatus == "NORMAL"
    assert "102 MU of the 100 MU planned" in beams[1].TreatmentTerminationDescription
    assert all(float(b.DeliveredPrimaryMeterset) == 100.0 for n, b in beams.items() if n != 1)
    assert all(b.TreatmentVerificationStatus == "VERIFIED" for n, b in beams.items() if n != 1)
    # No control-point item the plan does not have: the overrun counts in the last segment.
    planned = {int(b.BeamNumber): int(b.NumberOfControlPoints) for b in plan.BeamSequence}
    for number, beam in beams.items():
        indices = [int(cp.ReferencedControlPointIndex) for cp in beam.ControlPointDeliverySequence]
        assert indices == list(range(planned[number] - 1)), (number, indices)
    assert dciodvfy_errors(record_path) == []


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def test_an_overrun_counts_as_a_meterset_fault(bench):
    spec, _sim, control = start_controller("tcp")
    send_fault(control, {"fault": "overrun", "mu": 2, "beam": 2})
    _site, device = bench(spec)
    registry = device.metrics.metrics.registry
    labels = {"ae": "TDD1", "kind": "meterset"}
    before = registry.get_sample_value("tdw_device_faults_total", labels) or 0.0
    (outcome,) = device.run_once()
    assert outcome.state == "COMPLETED"
    assert outcome.delivered[2] == pytest.approx(102.0)
    assert [flag.split(":")[0] for flag in outcome.flags] == [
        "beam 2 delivered 102 MU of the 100 MU planned (+2.00 MU, beyond the 1 MU tolerance)"
    ]
    assert registry.get_sample_value("tdw_device_faults_total", labels) == before + 1


def test_control_points_numbered_from_0_are_refused_never_recorded_as_minus_1(bench):
    spec, sim, _control = start_controller("tcp", quirks=["cp-from-zero"])
    site, device = bench(spec)
    (outcome,) = device.run_once()
    assert outcome.state == "CANCELED"
    assert "protocol error" in outcome.reason and "CONTROL_POINT index 0" in outcome.reason
    # Beam 1 (static: its one control point is reached at its end) was held at the bad
    # index; the record holds what the machine measured of it, no beam after it was started.
    (machine,) = sim.deliveries
    assert outcome.delivered == {1: pytest.approx(machine["measured"])}
    (info,) = site.archive.store.select("modality = 'RTRECORD'")
    record = site.archive.store.read(info)
    (beam,) = record.TreatmentSessionBeamSequence
    assert beam.TreatmentTerminationStatus == "MACHINE"
    assert beam.MachineSpecificTreatmentTerminationCodeSequence[0].CodeValue == "PROTOCOL"
    indices = [int(cp.ReferencedControlPointIndex) for cp in beam.ControlPointDeliverySequence]
    assert indices == [0], indices  # the plan's segment 0 -> 1, never -1
    assert dciodvfy_errors(site.archive.store.path_for(info.sha256)) == []


class _VersionOneController:
    """A controller of protocol version 1: it answers HELLO with ``protocol`` 1 whatever it
    is asked (written with the independent peer's framing, not the product's)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                splitter = FrameSplitter()
                while chunk := conn.recv(4096):
                    for frame in map(decode_frame, splitter.feed(chunk)):
                        if frame.name == "HELLO":
                            conn.sendall(encode_frame("ACK", frame.seq, {}))
                            reply = {"protocol": 1, "identity": {}, "capabilities": {}}
                            conn.sendall(encode_frame("HELLO_REPLY", 0, reply))

    def close(self) -> None:
        self.server.close()


def test_a_version_1_controller_is_refused_in_one_sentence(tmp_path):
    old = _VersionOneController()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "emulator.cli", "run", "--kind", "tdd",
             "--station", "LINAC1", "--tms", "TMS@127.0.0.1:1", "--archive", "ARCHIVE@127.0.0.1:2",
             "--listen-port", str(free_port()),
             "--device", f"tcp://{old.address[0]}:{old.address[1]}",
             "--report-dir", str(tmp_path / "report"), "--data-dir", str(tmp_path / "dev")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        old.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        "the controller speaks protocol 1; this host speaks 2 (hil/PROTOCOL.md, Versioning): "
        "update its firmware"
    ) in result.stderr
