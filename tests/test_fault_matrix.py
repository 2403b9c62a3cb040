"""The fault matrix at real speed: each controller fault before, within and between beams,
on controller-sim at time scale 1 (the short-motion machine profile linac-fast.yaml keeps
the travel short; beams take their real 10 s).

Whatever the fault, the same three things must hold (hil/PROTOCOL.md, docs/faults.md):
- a record is stored whenever the machine delivered more than 0 MU;
- the record holds the controller's measured MU, or, where the count could not be
  confirmed, termination UNKNOWN and a session the TMS marked for review;
- a continuation delivers the plan minus the measured MU, and not a MU more.

`make test` runs one moment of each fault; TDW_HIL_MATRIX=full runs all eighteen.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

import pytest

from devices.base import BeamEnded, MetersetTick
from emulator.net.peers import Peer
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from emulator.synth.plan_access import specified_metersets
from hil.controller_sim import ControllerSim
from hil.faults import ControlChannel, Faults, send_fault
from tests.conftest import free_port

TWO_BEAMS = SeedOptions(slices=6, rows=48, beams=2, dynamic_beams=1, control_points=6)
FAULTS = {
    "stall": {"fault": "stall", "seconds": 4},
    "unplug": {"fault": "unplug", "seconds": 4},
    "drop": {"fault": "drop"},
    "garble": {"fault": "garble", "rate": 0.2},
    "stuck_axis": {"fault": "stuck_axis", "axis": "gantry", "short_by": 3},
    "interlock": None,  # placed on the beam itself, see _interlock
}
MOMENTS = ("before", "within", "between")
# In `make test`, one real-time case of each fault; the rest behind TDW_HIL_MATRIX=full.
QUICK = {
    ("stall", "within"),
    ("unplug", "between"),
    ("drop", "within"),
    ("garble", "within"),
    ("stuck_axis", "between"),
    ("interlock", "within"),
}
FULL = os.environ.get("TDW_HIL_MATRIX", "") == "full"
CASES = [
    pytest.param(fault, moment, id=f"{fault}-{moment}")
    for fault in FAULTS
    for moment in MOMENTS
    if FULL or (fault, moment) in QUICK
]


def _interlock(moment: str, plan_mu: dict[int, float]) -> dict:
    """An interlock on beam 1 at its first MU (before), mid beam 2 (within), or at the
    start of beam 2 (between: the beam trips the moment it is switched on)."""
    if moment == "before":
        return {"fault": "interlock", "beam": 1, "meterset": 0.5}
    if moment == "within":
        return {"fault": "interlock", "beam": 2, "meterset": plan_mu[2] * 0.4}
    return {"fault": "interlock", "beam": 2, "meterset": 0.1}


@pytest.fixture
def rig(tmp_path):
    faults = Faults()
    sim = ControllerSim("linac-fast", 1.0, faults)
    control = ControlChannel(faults)
    ready = threading.Event()
    threading.Thread(target=sim.serve_tcp, kwargs={"ready": ready}, daemon=True).start()
    ready.wait(5)
    port = free_port()
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            seed_options=TWO_BEAMS,
            peers=[Peer("TDD1", "127.0.0.1", port)],
        )
    )
    site.start()
    site.seed("LINAC1", 1)
    device = PerformingDevice(
        DeviceConfig(
            "tdd",
            "LINAC1",
            "TDD1",
            Peer("TMS", *site.tms.address),
            Peer("ARCHIVE", *site.archive.address),
            tmp_path / "device",
            listen_port=port,
            device=f"tcp://{sim.address[0]}:{sim.address[1]}?reconnect_s=8",
        )
    )
    device.start()
    yield site, device, sim, control.address
    device.stop()
    site.stop()
    control.close()


def _measured(sim: ControllerSim) -> dict[int, float]:
    """What the machine delivered per beam, every beam-on, by its own count."""
    total: dict[int, float] = defaultdict(float)
    for beam_on in sim.deliveries:
        total[beam_on["beam"]] += beam_on["measured"] - beam_on["start"]
    return dict(total)


def _recorded(site: ReferenceSite, uids: list[str]) -> tuple[dict[int, float], list[str]]:
    total: dict[int, float] = defaultdict(float)
    terminations = []
    for uid in uids:
        record = site.archive.store.read(site.archive.store.get(uid))
        for beam in record.TreatmentSessionBeamSequence:
            total[int(beam.ReferencedBeamNumber)] += float(beam.DeliveredPrimaryMeterset)
            terminations.append(str(beam.TreatmentTerminationStatus))
    return dict(total), terminations


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("fault", "moment"), CASES)
def test_every_fault_leaves_a_true_record(rig, fault, moment):
    site, device, sim, control = rig
    plan = next(iter(site.archive.store.select("modality = 'RTPLAN'")))
    plan_mu = specified_metersets(site.archive.store.read(plan))
    command = _interlock(moment, plan_mu) if fault == "interlock" else FAULTS[fault]
    injected = threading.Event()

    def inject() -> None:
        if not injected.is_set():
            injected.set()
            assert send_fault(control, command)["ok"]

    def on_event(task, event) -> None:
        beam = task.program.beam_number
        halfway = isinstance(event, MetersetTick) and event.meterset >= plan_mu[2] * 0.3
        if moment == "within" and beam == 2 and halfway:
            inject()
        if moment == "between" and beam == 1 and isinstance(event, BeamEnded):
            inject()

    if moment == "before" or fault == "interlock":
        inject()
    device.on_event = on_event
    (first,) = device.run_once()
    send_fault(control, {"fault": "clear"})

    assert first.state in ("COMPLETED", "CANCELED"), first
    measured = _measured(sim)
    recorded, terminations = _recorded(site, first.stored)
    if sum(measured.values()) > 0:
        assert first.stored, f"{sum(measured.values())} MU delivered and no record"
    if "UNKNOWN" in terminations:
        (session,) = site.tms.ups.sessions()
        assert "needs review" in session.note
        assert site.tms.continuations == []
        return
    for beam, mu in measured.items():
        assert recorded.get(beam, 0.0) == pytest.approx(mu, abs=1e-3), (beam, recorded, measured)
    if first.state == "COMPLETED" or not site.tms.continuations:
        return
    (second,) = device.run_once()
    assert second.state == "COMPLETED", second.reason
    continued, _ = _recorded(site, second.stored)
    for beam, planned in plan_mu.items():
        given = recorded.get(beam, 0.0) + continued.get(beam, 0.0)
        assert given == pytest.approx(planned, abs=1e-3), (beam, recorded, continued)
