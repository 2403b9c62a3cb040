"""Timing fidelity of real-time delivery over the TCP link, with 1 device and with 20.

Each device drives its own controller simulator at time scale 1 through one DYNAMIC beam
(100 MU at 600 MU/min over 20 control points). For every CONTROL_POINT event the host
receives, the error is its arrival time minus its schedule: the moment BEAM_STARTED
arrived, plus the controller's beam-on delay, plus the cumulative meterset over the dose
rate. p50 and p99 of those errors are printed for 1 device alone and for 20 devices at
once, with the ratio of the p99s: first with every controller simulator in the host's own
process (one Python process does the work of 21 machines), then with each controller in a
process of its own, as on a bench rig where the controller is its own box.

    .venv/bin/python benchmarks/timing_fidelity.py [--devices 20] [--time-scale 1]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices.base import ControlPointReached
from devices.clock import Clock
from devices.registry import open_device
from devices.sim.linac import load_machine_profile
from emulator.performer.delivery import beam_program
from emulator.synth import PhantomGeometry, PlanSpec, generate_patient
from hil.controller_sim import ControllerSim

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _controller_in_process(time_scale: float) -> tuple[str, object]:
    sim = ControllerSim(time_scale=time_scale)
    ready = threading.Event()
    threading.Thread(target=sim.serve_tcp, kwargs={"ready": ready}, daemon=True).start()
    ready.wait(5)
    return f"{sim.address[0]}:{sim.address[1]}", None


def _controller_apart(time_scale: float) -> tuple[str, subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "hil", "controller-sim", "--tcp", "127.0.0.1:0",
         "--time-scale", str(time_scale)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    for line in process.stdout:
        found = re.search(r"tcp://(\S+)", line)
        if found:
            return found[1], process
    raise RuntimeError("controller-sim did not start")


def one_device(program, address: str, time_scale: float, errors: list, lock) -> None:
    delay = float(load_machine_profile("linac")["timing"]["beam_on_delay_s"]) * time_scale
    rate = program.dose_rate / 60.0 / time_scale if time_scale else float("inf")
    schedule = {cp.index: cp.cumulative_meterset / rate for cp in program.control_points}
    with open_device(f"tcp://{address}", Clock(0)) as device:
        device.load_beam(program)
        started = time.perf_counter()
        mine = []
        for event in device.beam_on():
            if isinstance(event, ControlPointReached):
                arrived = time.perf_counter() - started
                mine.append(arrived - (delay + schedule[event.index]))
    with lock:
        errors.extend(mine)


def scenario(program, devices: int, time_scale: float, apart: bool) -> list[float]:
    start = _controller_apart if apart else _controller_in_process
    controllers = [start(time_scale) for _ in range(devices)]
    errors: list[float] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=one_device, args=(program, address, time_scale, errors, lock))
        for address, _ in controllers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _, process in controllers:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--time-scale", type=float, default=1.0)
    args = parser.parse_args()
    plan = generate_patient(
        geometry=PhantomGeometry(rows=32, columns=32, slices=4),
        plan_spec=PlanSpec(beams=1, dynamic_beams=1, control_points=20),
    ).plan
    program = beam_program(plan, 1)
    print(
        f"control-point event error against schedule, TCP link, time scale {args.time_scale}, "
        f"{len(program.control_points) - 1} control points per beam"
    )
    for apart in (False, True):
        where = "each controller in its own process" if apart else "controllers in-process"
        results = {
            1: scenario(program, 1, args.time_scale, apart),
            args.devices: scenario(program, args.devices, args.time_scale, apart),
        }
        print(f"  {where}:")
        for devices, errors in results.items():
            print(
                f"    {devices:>3} device(s): {len(errors):4d} events  p50 "
                f"{percentile(errors, 0.5) * 1e3:7.2f} ms  p99 "
                f"{percentile(errors, 0.99) * 1e3:7.2f} ms"
            )
        single, many = results[1], results[args.devices]
        ratio = percentile(many, 0.99) / percentile(single, 0.99) if percentile(single, 0.99) else 0
        print(f"    p99 ratio {args.devices} devices / 1 device: {ratio:.2f}")


if __name__ == "__main__":
    main()
