"""What a fleet's receivers cost idle: one Storage SCP per device, or one shared by all.

In one process, as in a soak worker: N devices' C-MOVE destinations, either N
StorageReceivers (a listening socket, an accept thread and a server loop each) or one
SharedStorageReceiver with N attached AE titles. Printed for both, measured in the same
run: threads, open descriptors, CPU seconds per idle second, and a C-ECHO to the last
device as a check that it answers.

    .venv/bin/python benchmarks/fleet_receivers.py [--devices 200] [--idle 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from emulator.net.receiver import StorageReceiver
from emulator.net.shared_receiver import SharedStorageReceiver


def idle_cost(idle_s: float) -> tuple[int, int, float]:
    time.sleep(1.0)
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(idle_s)
    per_s = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return threading.active_count(), len(os.listdir("/proc/self/fd")), per_s


def echo(address: tuple[str, int], called: str) -> bool:
    ae = AE("ARCHIVE")
    ae.add_requested_context(Verification)
    assoc = ae.associate(*address, ae_title=called)
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def separate(devices: int, root: Path, idle_s: float) -> tuple:
    receivers = [
        StorageReceiver(root / f"r{n}", f"PDS{n:03d}", [], ["ARCHIVE"]) for n in range(devices)
    ]
    addresses = [r.start() for r in receivers]
    try:
        cost = idle_cost(idle_s)
        return (*cost, echo(addresses[-1], f"PDS{devices - 1:03d}"))
    finally:
        for receiver in receivers:
            receiver.stop()


def shared(devices: int, root: Path, idle_s: float) -> tuple:
    with SharedStorageReceiver([]) as receiver:
        for n in range(devices):
            receiver.attach(f"PDS{n:03d}", root / f"s{n}", ["ARCHIVE"])
        cost = idle_cost(idle_s)
        return (*cost, echo(receiver.address, f"PDS{devices - 1:03d}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--idle", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = idle_cost(args.idle)
        one_each = separate(args.devices, Path(tmp), args.idle)
        one_for_all = shared(args.devices, Path(tmp), args.idle)
    print(f"{args.devices} devices' receivers in one process, idle {args.idle:g} s")
    print(f"{'':26}{'threads':>8}{'fds':>6}{'CPU s per s':>13}{'answers':>9}")
    print(f"{'nothing (baseline)':26}{base[0]:>8}{base[1]:>6}{base[2]:>13.3f}{'':>9}")
    for name, r in (("one receiver per device", one_each), ("one shared receiver", one_for_all)):
        print(f"{name:26}{r[0]:>8}{r[1]:>6}{r[2]:>13.3f}{'yes' if r[3] else 'no':>9}")
    print(
        f"ratio shared/separate: threads {one_for_all[0] / one_each[0]:.3f}, "
        f"CPU {one_for_all[2] / max(one_each[2], 1e-9):.3f}"
    )


if __name__ == "__main__":
    main()
