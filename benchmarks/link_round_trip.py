"""Command round trip over the protocol-v1 link: a real pty pair and loopback TCP.

A HEARTBEAT is sent to the controller simulator and timed until its HEARTBEAT_REPLY
arrives (two data frames and two ACKs). The same number of round trips is run over both
transports in the same process; p50 and p99 are printed, with the TCP/pty ratio.

    .venv/bin/python benchmarks/link_round_trip.py [--count 2000] [--time-scale 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices.link import Link, SerialTransport, SocketTransport
from devices.protocol import MessageType
from hil.controller_sim import ControllerSim


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def round_trips(link: Link, count: int) -> list[float]:
    link.send(MessageType.HELLO, {"protocol": 1})
    link.recv(timeout=5)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        link.send(MessageType.HEARTBEAT, {})
        reply = link.recv(timeout=5)
        times.append(time.perf_counter() - started)
        assert reply is not None and reply.type == MessageType.HEARTBEAT_REPLY
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--time-scale", type=float, default=1.0, help="the controller's")
    args = parser.parse_args()
    results = {}
    pty_sim = ControllerSim(time_scale=args.time_scale)
    master, path = pty_sim.open_pty()
    threading.Thread(target=pty_sim.serve_pty, args=(master,), daemon=True).start()
    link = Link(SerialTransport(path))
    results["pty (pyserial)"] = round_trips(link, args.count)
    link.close()
    tcp_sim = ControllerSim(time_scale=args.time_scale)
    ready = threading.Event()
    threading.Thread(target=tcp_sim.serve_tcp, kwargs={"ready": ready}, daemon=True).start()
    ready.wait(5)
    link = Link(SocketTransport.connect(*tcp_sim.address))
    results["tcp (loopback)"] = round_trips(link, args.count)
    link.close()
    print(
        f"HEARTBEAT round trip, {args.count} commands each, controller time scale {args.time_scale}"
    )
    for name, times in results.items():
        print(
            f"  {name:<16} p50 {percentile(times, 0.5) * 1e3:7.3f} ms   "
            f"p99 {percentile(times, 0.99) * 1e3:7.3f} ms   mean "
            f"{statistics.mean(times) * 1e3:7.3f} ms"
        )
    ratio = percentile(results["tcp (loopback)"], 0.5) / percentile(results["pty (pyserial)"], 0.5)
    print(f"  p50 ratio tcp/pty {ratio:.2f}")


if __name__ == "__main__":
    main()
