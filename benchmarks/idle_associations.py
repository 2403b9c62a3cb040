"""What pynetdicom's polling loops cost, with and without emulator/net/reactor_wakeup.py.

In one process, as in a soak worker or the reference TMS: a Storage SCP (the fleet's shared
receiver) and N associations to it held open and idle for a few seconds, then a round of
C-ECHOs on each, then associations opened, echoed and released one after another (a
device's exchange with its TMS). Printed: the process's CPU seconds per idle second (both
sides of every association live in this process), the C-ECHO round trip and the whole
association cycle, p50 and p99, for pynetdicom as it ships and with the wake-up guard,
measured in the same run, with their ratios.

    .venv/bin/python benchmarks/idle_associations.py [--associations 50] [--idle 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from emulator.net import reactor_wakeup
from emulator.net.ae_factory import NetworkSettings
from emulator.net.shared_receiver import SharedStorageReceiver


def measure(associations: int, idle_s: float, echoes: int) -> dict:
    settings = NetworkSettings(maximum_associations=associations + 8)
    with SharedStorageReceiver([], settings=settings) as receiver:
        for n in range(associations):
            receiver.attach(f"IDLE{n:03d}", Path("/tmp") / "tdw-idle-bench" / str(n), ["BENCH"])
        ae = AE("BENCH")
        ae.add_requested_context(Verification)
        host, port = receiver.address
        open_ = [ae.associate(host, port, ae_title=f"IDLE{n:03d}") for n in range(associations)]
        assert all(a.is_established for a in open_)
        time.sleep(1.0)  # settled
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(idle_s)
        cpu_per_s = (time.process_time() - cpu) / (time.perf_counter() - wall)
        trips = []
        for _ in range(echoes):
            for assoc in open_:
                started = time.perf_counter()
                assert assoc.send_c_echo().Status == 0
                trips.append(time.perf_counter() - started)
        for assoc in open_:
            assoc.release()
        # One association per exchange, as a device opens one per burst (tms_link.py).
        cycles = []
        for _ in range(echoes * 10):
            started = time.perf_counter()
            assoc = ae.associate(host, port, ae_title="IDLE000")
            assert assoc.send_c_echo().Status == 0
            assoc.release()
            cycles.append(time.perf_counter() - started)
    trips.sort()
    cycles.sort()
    return {
        "cpu_per_idle_s": cpu_per_s,
        "p50_ms": statistics.median(trips) * 1000,
        "p99_ms": trips[int(0.99 * (len(trips) - 1))] * 1000,
        "cycle_p50_ms": statistics.median(cycles) * 1000,
        "cycle_p99_ms": cycles[int(0.99 * (len(cycles) - 1))] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=50)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds held idle")
    parser.add_argument("--echoes", type=int, default=10, help="C-ECHOs per association")
    args = parser.parse_args()
    reactor_wakeup.uninstall()
    shipped = measure(args.associations, args.idle, args.echoes)
    reactor_wakeup.install()
    guarded = measure(args.associations, args.idle, args.echoes)
    print(f"{args.associations} idle associations (both ends in this process), {args.idle:g} s")
    print(
        f"{'':22}{'CPU s per s':>12}{'echo p50 ms':>13}{'echo p99 ms':>13}"
        f"{'cycle p50 ms':>14}{'cycle p99 ms':>14}"
    )
    for name, r in (("pynetdicom as shipped", shipped), ("with reactor_wakeup", guarded)):
        print(
            f"{name:22}{r['cpu_per_idle_s']:12.3f}{r['p50_ms']:13.2f}{r['p99_ms']:13.2f}"
            f"{r['cycle_p50_ms']:14.2f}{r['cycle_p99_ms']:14.2f}"
        )
    ratio = {k: guarded[k] / shipped[k] for k in shipped}
    print(
        f"ratio guarded/shipped: CPU {ratio['cpu_per_idle_s']:.3f}, echo p50 "
        f"{ratio['p50_ms']:.2f}, p99 {ratio['p99_ms']:.2f}; association cycle p50 "
        f"{ratio['cycle_p50_ms']:.2f}, p99 {ratio['cycle_p99_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
