"""The machine model: axes, couch geometry and the dosimetry of a beam-on.

Nothing here talks to the wire; :mod:`.controller` drives it under its lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COUCH_AXES = ("lateral_mm", "longitudinal_mm", "vertical_mm", "pitch_deg", "roll_deg", "yaw_deg")
TRANSLATION_AXES = COUCH_AXES[:3]
ROTATION_AXES = COUCH_AXES[3:]

# IEC 61217 table-top (lateral X, longitudinal Y, vertical Z) to DICOM patient LPS, per
# patient position (PROTOCOL.md, Units and axes): v_lps = M @ v_iec.  All four are proper
# rotations, so rotation vectors map the same way.
IEC_TO_LPS: dict[str, np.ndarray] = {
    # HFS: lateral = x, longitudinal = z, vertical = -y
    "HFS": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    # HFP: lateral = -x, longitudinal = z, vertical = y
    "HFP": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    # FFS: lateral = -x, longitudinal = -z, vertical = -y
    "FFS": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]),
    # FFP: lateral = x, longitudinal = -z, vertical = y
    "FFP": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


def rotation_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def extrinsic_xyz(ax: float, ay: float, az: float) -> np.ndarray:
    """Right-handed rotations about the fixed X, then Y, then Z axes (degrees)."""
    return rotation_z(az) @ rotation_y(ay) @ rotation_x(ax)


def move_pose(motion: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """One MOVE_COUCH as a rigid motion of the table top in IEC 61217 table-top axes,
    ``x' = R x + d`` about the isocentre (PROTOCOL.md, Units and axes): first the rotation
    (pitch, then roll, then yaw, about the fixed X, Y, Z axes), then the translation."""
    r = extrinsic_xyz(motion["pitch_deg"], motion["roll_deg"], motion["yaw_deg"])
    d = np.array([motion["lateral_mm"], motion["longitudinal_mm"], motion["vertical_mm"]])
    return r, d


def compose(after, before) -> tuple[np.ndarray, np.ndarray]:
    """The rigid motion ``before`` followed by ``after`` (each ``(R, d)``)."""
    r_a, d_a = after
    r_b, d_b = before
    return r_a @ r_b, r_a @ d_b + d_a


def pose_in_lps(pose, patient_position: str) -> tuple[np.ndarray, np.ndarray]:
    """A table-top rigid motion ``(R, d)`` (IEC axes) in the patient's LPS axes."""
    m = IEC_TO_LPS[patient_position]
    r_iec, d_iec = pose
    return m @ r_iec @ m.T, m @ d_iec


def table_top_pose_lps(couch: dict[str, float], patient_position: str):
    """The rigid motion (R, d) in patient LPS, p' = R p + d, of one move by ``couch``
    (six table-top values) from the zero: the rotation about the isocentre first, then the
    translation.  Several moves compose (:func:`compose`); their summed fields are not
    the pose of the table top once a move rotates."""
    return pose_in_lps(move_pose(couch), patient_position)


def lps_to_table_top(vector_lps, patient_position: str) -> tuple[float, float, float]:
    """A patient-LPS vector (translation or rotation vector) in table-top axes."""
    m = IEC_TO_LPS[patient_position]
    v = m.T @ np.asarray(vector_lps, dtype=float)
    return float(v[0]), float(v[1]), float(v[2])


def angle_diff(a: float, b: float) -> float:
    """Signed shortest rotation from angle a to angle b, degrees in (-180, 180]."""
    d = (b - a) % 360.0
    return d - 360.0 if d > 180.0 else d


@dataclass
class Axes:
    """Gantry, collimator (degrees, IEC 61217), jaws [X1, X2, Y1, Y2] and MLC (mm)."""

    gantry: float = 0.0
    collimator: float = 0.0
    jaws: list[float] = field(default_factory=lambda: [-100.0, 100.0, -100.0, 100.0])
    mlc: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, cp: dict[str, Any]) -> Axes:
        return cls(
            float(cp["gantry_angle"]) % 360.0,
            float(cp["collimator_angle"]) % 360.0,
            [float(v) for v in cp["jaws"]],
            [float(v) for v in cp["mlc"]],
        )

    def copy(self) -> Axes:
        return Axes(self.gantry, self.collimator, list(self.jaws), list(self.mlc))

    def lerp(self, other: Axes, f: float) -> Axes:
        f = min(1.0, max(0.0, f))
        mlc = other.mlc
        if len(self.mlc) == len(other.mlc):
            mlc = [a + f * (b - a) for a, b in zip(self.mlc, other.mlc, strict=True)]
        elif f < 1.0 and self.mlc:
            mlc = list(self.mlc)
        return Axes(
            (self.gantry + f * angle_diff(self.gantry, other.gantry)) % 360.0,
            (self.collimator + f * angle_diff(self.collimator, other.collimator)) % 360.0,
            [a + f * (b - a) for a, b in zip(self.jaws, other.jaws, strict=True)],
            mlc,
        )

    def travel_time(self, other: Axes, gantry_speed: float, leaf_speed: float) -> float:
        """Seconds (machine time) for the slowest of gantry and leaves."""
        t = abs(angle_diff(self.gantry, other.gantry)) / gantry_speed
        if len(self.mlc) == len(other.mlc) and self.mlc:
            leaf = max(abs(a - b) for a, b in zip(self.mlc, other.mlc, strict=True))
            t = max(t, leaf / leaf_speed)
        return t


@dataclass
class Segment:
    """From the previous control point to control point ``index`` (its Control Point Index)."""

    index: int
    start_mu: float
    target_mu: float
    start_axes: Axes
    end_axes: Axes
    mu_per_s: float  # machine time; 0 for a segment without MU
    pause_s: float  # motion-only segment duration (no MU)

    @property
    def delivers(self) -> bool:
        return self.target_mu > self.start_mu


@dataclass
class Event:
    kind: str  # "cp" or "end"
    index: int = 0
    meterset: float = 0.0
    gantry: float = 0.0


def start_control_point(control_points: list[dict[str, Any]], start: float) -> int:
    """The control point the axes go to for a delivery from ``start`` MU (LOAD_BEAM):
    control point 0 for a new beam (``start`` 0, even when control point 1 has no MU
    before it: its motion is the first segment, and it is reported); for a continuation
    the last control point at or before ``start``."""
    if start <= 0:
        return 0
    k = 0
    for i, cp in enumerate(control_points):
        if float(cp["cumulative_meterset"]) <= start + 1e-9:
            k = i
    return k


class Dosimetry:
    """One beam-on, stepped in machine time by ``dt`` seconds.

    The monitor chamber counts MU at the segment's dose rate with a small seeded
    fluctuation; the control system servoes on that measured count: control point
    ``index`` is reached at the first sample at or past its cumulative meterset (for a
    segment without MU, when its motion is done), the beam stops at the first sample at or
    past ``end + overrun``, or an interlock trips at the first sample at or past its
    meterset.  Everything reported is what was measured at that sample.
    """

    def __init__(
        self,
        control_points: list[dict[str, Any]],
        *,
        start: float,
        end: float,
        dose_rate: float,
        gantry_speed: float,
        leaf_speed: float,
        overrun: float,
        trip: tuple[float, str, str] | None,
        rng: np.random.Generator,
        dt: float = 0.01,
    ) -> None:
        self.dt = dt
        self.nominal_mu_per_s = dose_rate / 60.0
        self.start = start
        self.end = end
        self.end_target = end + max(0.0, overrun)
        self.trip = trip if trip is not None and trip[0] < self.end_target else None
        self.rng = rng
        self.m = start
        self.t = 0.0
        self.pause_elapsed = 0.0
        self.finished = False
        self.termination = ""
        self.code = ""
        self.reason = ""
        k = start_control_point(control_points, start)
        self.axes = Axes.of(control_points[k])
        self.segments: list[Segment] = []
        prev_axes = self.axes.copy()
        prev_mu = start
        for cp in control_points[k + 1 :]:
            target = float(cp["cumulative_meterset"])
            axes = Axes.of(cp)
            dmu = max(0.0, target - prev_mu)
            motion = prev_axes.travel_time(axes, gantry_speed, leaf_speed)
            if dmu > 0:
                rate = self.nominal_mu_per_s
                if motion > 0:
                    rate = min(rate, dmu / motion)
                seg = Segment(int(cp["index"]), prev_mu, target, prev_axes, axes, rate, 0.0)
            else:
                seg = Segment(int(cp["index"]), prev_mu, prev_mu, prev_axes, axes, 0.0, motion)
            self.segments.append(seg)
            prev_axes = axes
            prev_mu = max(prev_mu, target)
        self.seg_i = 0

    @property
    def segment(self) -> Segment | None:
        return self.segments[self.seg_i] if self.seg_i < len(self.segments) else None

    @property
    def measured(self) -> float:
        return round(self.m, 2)

    def _gantry_reading(self) -> float:
        g = self.axes.gantry + float(self.rng.uniform(-0.05, 0.05))
        return round(g % 360.0, 1) % 360.0

    def _update_axes(self) -> None:
        seg = self.segment
        if seg is None:
            return
        if seg.delivers:
            f = (self.m - seg.start_mu) / (seg.target_mu - seg.start_mu)
        else:
            f = 1.0 if seg.pause_s <= 0 else self.pause_elapsed / seg.pause_s
        self.axes = seg.start_axes.lerp(seg.end_axes, f)

    def _reach(self, events: list[Event], flush: bool = False) -> None:
        while (seg := self.segment) is not None:
            if seg.delivers:
                reached = self.m >= seg.target_mu
            else:
                reached = flush or self.pause_elapsed + 1e-12 >= seg.pause_s
            if not reached:
                break
            self.axes = seg.end_axes.copy()
            events.append(Event("cp", seg.index, self.measured, self._gantry_reading()))
            self.seg_i += 1
            self.pause_elapsed = 0.0

    def step(self) -> list[Event]:
        """One dosimetry sample."""
        events: list[Event] = []
        if self.finished:
            return events
        self.t += self.dt
        seg = self.segment
        if seg is not None and not seg.delivers:
            self.pause_elapsed += self.dt
        else:
            rate = seg.mu_per_s if seg is not None else self.nominal_mu_per_s
            self.m += rate * self.dt * (1.0 + float(self.rng.uniform(-0.02, 0.02)))
        self._reach(events)
        self._update_axes()
        if self.trip is not None and self.m >= self.trip[0]:
            self.stop("MACHINE", self.trip[1], self.trip[2])
        elif self.m >= self.end_target:
            self._reach(events, flush=True)
            self.stop("NORMAL", "", "")
        if self.finished:
            events.append(Event("end", meterset=self.measured))
        return events

    def stop(self, termination: str, code: str, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.termination, self.code, self.reason = termination, code, reason

    def run_until(self, machine_t: float) -> list[Event]:
        """Step until the machine time ``machine_t`` (or the end)."""
        events: list[Event] = []
        while not self.finished and self.t + self.dt <= machine_t + 1e-12:
            events.extend(self.step())
        return events
