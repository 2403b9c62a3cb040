"""Times the PPS's CBCT-to-planning registration with the planning CT prepared once.

For three planning CTs (the test's 40-slice, a soak's 8-slice 64 x 64, the session
benchmark's 16-slice), the simulated couch holds the patient with its setup error, the
simulated imager takes a CBCT, and both are registered twice in this run: as a session
did before (decode the planning CT's images, smooth, compute spline coefficients, then
search) and as it does now (``prepared_planning``: that work done by the first session of
the process and kept). It prints milliseconds, resamplings and the error left against the
simulator's ground truth.

    python benchmarks/registration.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from scipy.spatial.transform import Rotation

from devices.clock import Clock
from devices.registry import open_device
from emulator.profile import load_sop_classes
from emulator.results import rigid_registration as rr
from emulator.results.acquisition import build_cbct_series
from emulator.synth import PatientContext
from emulator.synth.ct import build_ct_series
from emulator.synth.phantom import PhantomGeometry

GEOMETRIES = {
    "40-slice 128x128": PhantomGeometry(),
    "8-slice 64x64 (soak)": PhantomGeometry(rows=64, columns=64, slices=8),
    "16-slice 128x128 (session)": PhantomGeometry(slices=16),
}


def left_over(matrix: np.ndarray, pose: np.ndarray) -> str:
    """What the correction leaves of the setup error: translation (mm), rotation (deg)."""
    error = matrix @ pose
    angles = Rotation.from_matrix(error[:3, :3]).as_euler("xyz", degrees=True)
    shift = ", ".join(f"{v:+.2f}" for v in error[:3, 3])
    turn = ", ".join(f"{v:+.2f}" for v in angles)
    return f"left ({shift}) mm ({turn})°"


def timed(run, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    uids = load_sop_classes()
    for label, geometry in GEOMETRIES.items():
        ctx = PatientContext(patient_name="TDW^Bench", patient_id="BENCH1")
        planning = build_ct_series(ctx, geometry, uids)
        with open_device("sim", Clock(0)) as device:
            device.place_patient(rr.volume_from_images(planning))
            pose = device.imager.pose
            cbct = rr.volume_from_images(build_cbct_series(ctx, device.acquire("CBCT"), uids, "X"))
        cold_ms, cold = timed(
            lambda planning=planning, cbct=cbct: rr.register_rigid(
                rr.volume_from_images(planning), cbct
            ),
            args.repeat,
        )
        rr.prepared_planning(planning, cbct.spacing)  # the first session of the process
        kept_ms, kept = timed(
            lambda planning=planning, cbct=cbct: rr.register_rigid(
                rr.prepared_planning(planning, cbct.spacing), cbct
            ),
            args.repeat,
        )
        print(f"{label}:")
        print(
            f"  prepared each time (baseline) {cold_ms:6.0f} ms  {cold.evaluations:5d} "
            f"resamplings  {left_over(cold.matrix, pose)}"
        )
        print(
            f"  prepared once, kept           {kept_ms:6.0f} ms  {kept.evaluations:5d} "
            f"resamplings  {left_over(kept.matrix, pose)}  ratio {kept_ms / cold_ms:.2f}"
        )


if __name__ == "__main__":
    main()
