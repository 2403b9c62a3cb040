"""``python -m tests.peers.controller --tcp 127.0.0.1:0 --time-scale 0.1``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .controller import IndependentController


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.controller")
    line = parser.add_mutually_exclusive_group()
    line.add_argument("--tcp", default="127.0.0.1:0", help="HOST:PORT to listen on")
    line.add_argument("--pty", action="store_true", help="serve a pty pair instead")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--patient-position", default="HFS")
    parser.add_argument("--anatomy", help="a directory of DICOM CT files")
    parser.add_argument(
        "--isocenter",
        help="where the rig puts the machine's isocentre in the planning CT: X,Y,Z (LPS, mm), "
        "or 'plan' (the RT Plan's beside the CT); default the planning CT's origin",
    )
    args = parser.parse_args(argv)
    isocenter = args.isocenter
    if isocenter is not None and isocenter != "plan":
        isocenter = [float(v) for v in isocenter.split(",")]
        if len(isocenter) != 3:
            parser.error("--isocenter takes X,Y,Z or 'plan'")
    controller = IndependentController(
        time_scale=args.time_scale,
        patient_position=args.patient_position,
        anatomy=args.anatomy,
        isocenter=isocenter,
    )
    if args.pty:
        print(f"controller listening on serial://{controller.serve_pty()}", flush=True)
    else:
        host, _, port = args.tcp.rpartition(":")
        bound = controller.serve_tcp(host or "127.0.0.1", int(port))
        print(f"controller listening on tcp://{bound[0]}:{bound[1]}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
