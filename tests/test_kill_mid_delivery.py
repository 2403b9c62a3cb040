"""kill -9 of ``tdw-emu run`` while the beam is on, held against the controller's own count.

The machine is the HIL controller simulator in its own process (as on a bench rig), so it
outlives the host and keeps the ground truth: every beam-on and the meterset it measured.
The host is killed at random moments while a beam is on, restarted, and finally run until
the worklist is empty. Then every beam the machine delivered must be in exactly one record
in the Archive, with no more meterset than the machine measured, and the records together
must add up to the plan: the TMS scheduled continuations of exactly the rest.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import defaultdict

from emulator.reference.ups_store import UpsStore
from emulator.store import ObjectStore
from emulator.synth.plan_access import specified_metersets
from hil.faults import send_fault
from tests.conftest import REPO, free_port, start_cli_process
from tests.kill_harness import (
    cancel_reason,
    named_results,
    run_command,
    run_to_the_end,
    start_site,
)

KILLS = 3
SEED = int(os.environ.get("TDW_KILL_SEED", "11"))  # where in the beam each kill lands
PATIENTS = 2


def _controller_report(control: tuple[str, int]) -> dict:
    return send_fault(control, {"fault": "status"})["controller"]


def _kill_while_beam_on(run: list[str], control, rng: random.Random) -> bool:
    """Starts the host, waits until it has a beam on, kills it a random moment later."""
    before = len(_controller_report(control)["deliveries"])
    process = subprocess.Popen(run, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            deliveries = _controller_report(control)["deliveries"][before:]
            last = deliveries[-1] if deliveries else None
            if last and not last["termination"] and last["measured"] > last["start"]:
                time.sleep(rng.uniform(0.0, 0.4))
                process.send_signal(signal.SIGKILL)
                return True
            time.sleep(0.02)
        return False
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_every_beam_the_machine_delivered_is_in_exactly_one_record(tmp_path):
    device_port = free_port()
    tms = start_site(tmp_path / "site", device_port, PATIENTS)
    controller = start_cli_process(
        "hil controller-sim",
        "--tcp", "127.0.0.1:0",
        "--time-scale", "0.1",
        ready="controller listening on",
    )  # fmt: skip
    try:
        spec = next(
            line.split("listening on ")[1]
            for line in controller.output
            if "controller listening on" in line
        )
        host, port = next(
            line.split(" on ")[1] for line in controller.output if "control channel on" in line
        ).rsplit(":", 1)
        control = (host, int(port))
        run = run_command(
            tms, device_port, tmp_path / "device",
            "--device", spec, "--sessions", "12", "--wait", "3",
        )  # fmt: skip
        rng = random.Random(SEED)
        kills = sum(_kill_while_beam_on(run, control, rng) for _ in range(KILLS))
        assert kills == KILLS, "the host never had a beam on to be killed during"
        run_to_the_end(run, tmp_path / "device")
        truth = _controller_report(control)["deliveries"]
    finally:
        controller.stop()
        tms.stop()

    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    archive = ObjectStore(tmp_path / "site" / "archive")
    try:
        workitems = ups.select()
        assert "IN PROGRESS" not in [w.state for w in workitems]
        reasons = [cancel_reason(w) for w in workitems]
        rebuilt = [r for r in reasons if "the device restarted while delivering" in r]
        assert len(rebuilt) >= 1, reasons
        states = [
            (str(w.dataset.get("ProcedureStepLabel", "")), w.state, reason)
            for w, reason in zip(workitems, reasons, strict=True)
        ]
        assert sum("the device restarted while" in r for r in reasons) == KILLS, states
        named = named_results(workitems)
        assert len(named) == len(set(named)), "a result is named by two UPS"
        records = [archive.read(i) for i in archive.select("modality = 'RTRECORD'")]
        assert {str(r.SOPInstanceUID) for r in records} <= set(named)
        plans = [archive.read(i) for i in archive.select("modality = 'RTPLAN'")]
    finally:
        ups.close()
        archive.close()

    measured: dict[int, float] = defaultdict(float)
    for beam_on in truth:
        measured[beam_on["beam"]] += beam_on["measured"] - beam_on["start"]
    recorded: dict[int, float] = defaultdict(float)
    for record in records:
        for beam in record.TreatmentSessionBeamSequence:
            recorded[int(beam.ReferencedBeamNumber)] += float(beam.DeliveredPrimaryMeterset)
    planned: dict[int, float] = defaultdict(float)
    for plan in plans:
        for number, meterset in specified_metersets(plan).items():
            planned[number] += meterset
    for number in planned:
        # The records hold exactly what the machine delivered: the journal up to the kill,
        # completed by the controller's own count of the beam the host died in...
        assert abs(recorded[number] - measured[number]) < 1e-3, (number, recorded, measured)
        # ...so the TMS continued each fraction with exactly the rest: together, the plan.
        assert abs(recorded[number] - planned[number]) < 1e-3, (number, recorded, planned)
