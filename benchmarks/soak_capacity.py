"""How many real-time devices one machine sustains, and how fast the reference TMS turns work.

Capacity, at time scale 1: for each device count on a ladder, a fresh soak (PDS only,
embedded TMS and Archive, no faults) runs for ``--duration`` seconds and drains. A count is
sustained when DIMSE p99 at the devices (after the warm-up) is under ``--p99-ms`` (100 ms),
no record or beam is lost and no UPS is left IN PROGRESS. The ladder is climbed twice in
the same run: with the worker processes (``tdw-emu soak``'s default: the TMS in its own
process, the devices in one process per core) and with everything in one process, the
baseline. Each climb stops at the first count that fails.

Throughput, at time scale 0 (the machine simulated instantly, so only the DICOM work is
left): ``--throughput-devices`` devices for ``--throughput-duration`` seconds; the TMS's
sessions per minute, for both layouts.

    .venv/bin/python benchmarks/soak_capacity.py [--ladder 200,400,600,800,1000] [--duration 300]
        [--single-ladder 25,50,100]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.metrics import Metrics
from emulator.soak.processes import ProcessFleet
from emulator.soak.runner import SoakConfig, SoakRun
from emulator.soak.verdict import Verdict


def soak(devices: int, duration: float, time_scale: float, workers: int) -> Verdict:
    config = SoakConfig(devices=devices, duration_s=duration, time_scale=time_scale)
    if workers:
        return ProcessFleet(config, workers, {}).run()
    return SoakRun(config, Metrics()).run()


def summary(verdict: Verdict) -> dict:
    latency = verdict.latency_ms.get("all", {})
    return {
        "p50_ms": latency.get("p50_ms", math.nan),
        "p99_ms": latency.get("p99_ms", math.nan),
        "completed": verdict.sessions.get("completed", 0),
        "per_minute": verdict.sessions_per_minute,
        "lost": verdict.records["lost_records"] + verdict.records["lost_beams"],
        "in_progress": verdict.tms.get("in_progress", 0),
        "ok": verdict.ok,
    }


def sustained(r: dict, p99_ms: float) -> bool:
    return r["ok"] and r["p99_ms"] < p99_ms and r["lost"] == 0 and r["in_progress"] == 0


def climb(name: str, ladder: list[int], args: argparse.Namespace, workers: int) -> int:
    """The largest count on the ladder sustained; 0 if none."""
    best = 0
    for devices in ladder:
        r = summary(soak(devices, args.duration, 1.0, workers))
        held = sustained(r, args.p99_ms)
        print(
            f"{name:>14} {devices:>7} {r['completed']:>9} {r['p50_ms']:>8.1f} {r['p99_ms']:>9.1f}"
            f" {r['lost']:>5} {r['in_progress']:>11} {'yes' if held else 'no':>9}",
            flush=True,
        )
        if not held:
            break
        best = devices
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ladder",
        default="200,400,600,800,1000",
        help="device counts, workers (to 1,000: the goal)",
    )
    parser.add_argument(
        "--single-ladder", help="device counts for the one-process baseline (default: --ladder)"
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds per rung")
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--throughput-devices", type=int, default=20)
    parser.add_argument("--throughput-duration", type=float, default=60.0)
    args = parser.parse_args()
    logging.getLogger("tdw.device").setLevel(logging.ERROR)
    ladder = [int(n) for n in args.ladder.split(",")]
    single_ladder = [int(n) for n in (args.single_ladder or args.ladder).split(",")]
    print(f"{os.cpu_count()} CPUs; capacity at time scale 1, {args.duration:g} s per rung")
    print(
        f"{'layout':>14} {'devices':>7} {'completed':>9} {'p50 ms':>8} {'p99 ms':>9}"
        f" {'lost':>5} {'in progress':>11} {'sustained':>9}"
    )
    layouts = ((f"{args.workers} workers", args.workers, ladder), ("one process", 0, single_ladder))
    capacity = {name: climb(name, rungs, args, workers) for name, workers, rungs in layouts}

    print(f"TMS throughput at time scale 0, {args.throughput_devices} devices")
    rate = {}
    for name, workers, _rungs in layouts:
        r = summary(soak(args.throughput_devices, args.throughput_duration, 0.0, workers))
        rate[name] = r["per_minute"]
        print(f"{name:>14}: {r['per_minute']:.1f} sessions per minute, p99 {r['p99_ms']:.1f} ms")

    (multi, multi_n), (single, single_n) = capacity.items()
    ratio = multi_n / single_n if single_n else math.inf
    print(
        f"capacity: {multi_n} real-time devices with {multi} against {single_n} in one process "
        f"(x {ratio:.1f}); DIMSE p99 < {args.p99_ms:g} ms, nothing lost, no UPS left IN PROGRESS"
    )
    speed = rate[multi] / rate[single] if rate[single] else math.inf
    print(
        f"throughput: {rate[multi]:.1f} sessions per minute with {multi} against "
        f"{rate[single]:.1f} in one process (x {speed:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
