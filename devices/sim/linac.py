"""A simulated C-arm linac that follows a beam's control points in (scaled) real time.

It delivers each segment at the beam's dose rate, reports meterset ticks and control
points, and ends a beam exactly where it stopped: at the end, at an operator interrupt, or
at an injected interlock. It never reports more meterset than it delivered.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from devices.base import (
    AxisState,
    BeamDeliverer,
    BeamEnded,
    BeamProgram,
    Capabilities,
    ControlPointReached,
    CouchCorrection,
    DeliveryEvent,
    DeviceError,
    Identity,
    Imager,
    ImageSet,
    Machine,
    MetersetTick,
    Positioner,
    Termination,
)
from devices.clock import Clock
from devices.couch_axes import ROTATIONS, TRANSLATIONS, TableTop, to_patient
from devices.geometry import Volume
from devices.sim.imager import SimulatedImager


def load_machine_profile(name_or_path: str = "linac") -> dict[str, Any]:
    """A machine profile from ``profiles/machines/NAME.yaml`` or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("profiles").joinpath("machines", f"{name_or_path}.yaml")
        if not resource.is_file():
            raise DeviceError(f"no machine profile {name_or_path!r}")
        text = resource.read_text(encoding="utf-8")
    return yaml.safe_load(text)


class SimulatedLinac(Machine, BeamDeliverer, Positioner, Imager):
    """``interlocks`` maps beam numbers to the meterset at which an interlock trips."""

    def __init__(
        self,
        profile: dict[str, Any],
        clock: Clock,
        interlocks: dict[int, float] | None = None,
        axis_faults: dict[str, float] | None = None,
    ) -> None:
        self.profile = profile
        self.clock = clock
        self.interlocks = dict(interlocks or {})
        # A stuck axis stops this far short of where it was sent (degrees or mm), e.g.
        # gantry, or a couch axis as couch_longitudinal_mm.
        self.axis_faults = dict(axis_faults or {})
        # A fault: each beam runs this many MU past its end before it stops.
        self.overrun_mu = 0.0
        self._beam: BeamProgram | None = None
        self._hold = threading.Event()
        self._hold_reason = ""
        self._hold_termination = Termination.OPERATOR
        self._hold_code = ""
        self._connected = False
        self.couch = TableTop()
        self.patient_position = "HFS"
        self._axes = AxisState(0.0, 0.0, (0.0, 0.0, 0.0, 0.0), (), self.couch)
        self.imager = SimulatedImager(profile)

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def identify(self) -> Identity:
        ident = self.profile["identity"]
        return Identity(ident["vendor"], ident["model"], ident["serial"], str(ident["firmware"]))

    def capabilities(self) -> Capabilities:
        p = self.profile
        return Capabilities(
            energies_mv=tuple(float(e) for e in p["energies_mv"]),
            max_dose_rate=float(p["dose_rate"]["max"]),
            min_dose_rate=float(p["dose_rate"]["min"]),
            mlc_leaf_pairs=int(p["mlc_leaf_pairs"]),
            max_beams=int(p["max_beams"]),
            patient_positions=tuple(p["patient_positions"]),
            gantry_speed_deg_s=float(p["axes"]["gantry_speed_deg_s"]),
            couch_speed_mm_s=float(p["axes"]["couch_speed_mm_s"]),
            couch_limits_mm=float(p["axes"]["couch_limits_mm"]),
            couch_rotation_limits_deg=float(p["axes"].get("rotation_limits_deg", 0.0)),
            **tolerances(p),
        )

    def _require_connected(self) -> None:
        if not self._connected:
            raise DeviceError("device is not connected")

    def load_beam(self, beam: BeamProgram) -> None:
        self._require_connected()
        caps = self.capabilities()
        if beam.energy_mv not in caps.energies_mv:
            raise DeviceError(f"beam {beam.beam_number}: {beam.energy_mv} MV not available")
        if not caps.min_dose_rate <= beam.dose_rate <= caps.max_dose_rate:
            raise DeviceError(f"beam {beam.beam_number}: dose rate {beam.dose_rate} out of range")
        if not 0 <= beam.start_meterset < beam.stop_meterset <= beam.total_meterset + 1e-6:
            raise DeviceError(f"beam {beam.beam_number}: meterset range is not deliverable")
        # The axes travel to where the beam starts (control point 0, or for a continuation
        # the one before its start meterset) at the gantry speed, the slowest axis.
        first = beam.start_point
        travel = abs((first.gantry_angle - self._axes.gantry_angle + 180) % 360 - 180)
        self.clock.sleep(travel / caps.gantry_speed_deg_s)
        self._move_axes(first)
        self._beam = beam
        self._hold.clear()
        self.clock.reset()

    def _move_axes(self, cp) -> None:
        gantry = cp.gantry_angle - self.axis_faults.get("gantry", 0.0)
        collimator = cp.collimator_angle - self.axis_faults.get("collimator", 0.0)
        self._axes = AxisState(gantry, collimator, tuple(cp.jaws), tuple(cp.mlc), self.couch)

    def axes(self) -> AxisState:
        return self._axes

    def beam_on(self) -> Iterator[DeliveryEvent]:
        self._require_connected()
        beam = self._beam
        if beam is None:
            raise DeviceError("no beam loaded")
        self._beam = None
        timing = self.profile["timing"]
        origin = self.clock.now()
        delay = float(timing["beam_on_delay_s"])
        self.clock.sleep_until(origin, delay)
        rate_per_s = beam.dose_rate / 60.0
        tick = float(timing["tick_s"])
        delivered = beam.start_meterset
        trip = self.interlocks.get(beam.beam_number)
        points = beam.control_points
        for target in points[1:]:
            if target.cumulative_meterset <= delivered + 1e-9:
                continue  # before a continuation's start: already delivered earlier
            segment_end = min(target.cumulative_meterset, beam.stop_meterset)
            while delivered < segment_end - 1e-9:
                step = min(rate_per_s * tick, segment_end - delivered)
                stop_at = None
                if trip is not None and delivered < trip <= delivered + step:
                    step, stop_at = trip - delivered, "MACHINE"
                # Paced against the beam's own schedule, not the previous step's end.
                due = delay + (delivered + step - beam.start_meterset) / rate_per_s
                awake = self.clock.sleep_until(origin, due)
                if self._hold.is_set() or not awake:
                    # An operator hold stops the beam where it is; the partial step of a
                    # wait that was cut short is not counted as delivered.
                    yield BeamEnded(
                        round(delivered, 4),
                        self._hold_termination,
                        self._hold_reason,
                        self._hold_code,
                    )
                    return
                delivered += step
                yield MetersetTick(round(delivered, 4), beam.dose_rate)
                if stop_at:
                    del self.interlocks[beam.beam_number]
                    yield BeamEnded(
                        round(delivered, 4), Termination.MACHINE, "dosimetry interlock", "DOSE1"
                    )
                    return
            if segment_end >= target.cumulative_meterset - 1e-9:
                self._move_axes(target)
                yield ControlPointReached(target.index, round(delivered, 4), target.gantry_angle)
            if delivered >= beam.stop_meterset - 1e-9:
                break
        if self.overrun_mu > 0:  # a fault: the dosimetry lets the beam run on, and counts it
            delivered += self.overrun_mu
            self.clock.sleep(self.overrun_mu / rate_per_s)
            yield MetersetTick(round(delivered, 4), beam.dose_rate)
        yield BeamEnded(round(delivered, 4), Termination.NORMAL)

    def arm_interlock(self, beam_number: int, meterset: float) -> None:
        """Fault injection: the dosimetry interlock trips when ``beam_number`` reaches
        ``meterset`` (cumulative MU, as in the plan); it trips once."""
        self.interlocks[int(beam_number)] = float(meterset)

    def disarm_interlocks(self) -> None:
        self.interlocks.clear()

    def interrupt(self, reason: str) -> None:
        self._hold_reason = reason or "operator beam hold"
        self._hold_termination, self._hold_code = Termination.OPERATOR, ""
        self._hold.set()
        self.clock.wake()

    def stop_beam(self, reason: str, code: str) -> None:
        """The machine stops the beam on its own (it lost its host): MACHINE, with ``code``."""
        self._hold_reason = reason
        self._hold_termination, self._hold_code = Termination.MACHINE, code
        self._hold.set()
        self.clock.wake()

    def move_couch(self, move: TableTop) -> TableTop:
        """Moves the table top (IEC 61217 axes) and the patient on it, within its limits,
        at its axis speeds; a couch fault (``axis_faults`` ``couch_<axis>``: mm or degrees)
        makes that axis fall short, and the position it returns says so, as encoders do."""
        self._require_connected()
        caps = self.capabilities()
        values = move.values()
        if any(abs(t) > caps.couch_limits_mm for t in values[:3]):
            raise DeviceError("couch correction exceeds the couch limits")
        if any(abs(r) > caps.couch_rotation_limits_deg for r in values[3:]):
            raise DeviceError(f"couch rotation beyond ±{caps.couch_rotation_limits_deg} degrees")
        reached = TableTop(
            *(
                _fall_short(value, self.axis_faults.get(f"couch_{name}", 0.0))
                for name, value in zip(TRANSLATIONS + ROTATIONS, values, strict=True)
            )
        )
        speed = float(self.profile["axes"].get("rotation_speed_deg_s", 1.0))
        seconds = max(abs(t) for t in values[:3]) / caps.couch_speed_mm_s
        seconds += max(abs(r) for r in values[3:]) / speed
        steps = 4
        for step in range(1, steps + 1):
            self.clock.sleep(seconds / steps)
            self._report_progress("MOVE_COUCH", step / steps)
        self.couch = self.couch + reached
        self._axes = replace(self._axes, couch=self.couch)
        self.imager.move(CouchCorrection(*to_patient(reached, self.patient_position)))
        return self.couch

    def couch_position(self) -> TableTop:
        return self.couch

    def place_patient(self, anatomy: Volume, patient_position: str = "HFS") -> None:
        self.patient_position = patient_position
        self.imager.lie_down(anatomy)

    def acquire(self, kind: str) -> ImageSet:
        """A CBCT of the placed patient (or the bench phantom) lying with the current pose."""
        self._require_connected()
        if kind not in self.imager.specs:
            raise DeviceError(f"imaging kind {kind!r} is not available")
        images = self.imager.acquire(kind)
        steps = 12  # one gantry rotation of 60 s, its progress told every 5 s
        for step in range(1, steps + 1):
            self.clock.sleep(60.0 / steps)
            self._report_progress("ACQUIRE", step / steps)
        return images


def tolerances(profile: dict[str, Any]) -> dict[str, float]:
    """The profile's couch and meterset tolerances, as Capabilities fields (the defaults of
    AAPM TG-142 where the profile gives none)."""
    given = profile.get("tolerances", {})
    return {
        "couch_tolerance_mm": float(given.get("couch_mm", 1.0)),
        "couch_tolerance_deg": float(given.get("couch_deg", 0.5)),
        "couch_retries": int(given.get("couch_retries", 1)),
        "meterset_tolerance_mu": float(given.get("meterset_mu", 1.0)),
    }


def _fall_short(value: float, by: float) -> float:
    """A motion of ``value`` that stops ``by`` short of it (never past zero)."""
    if not by or not value:
        return value
    return value - min(abs(by), abs(value)) * (1 if value > 0 else -1)


def make_simulated_device(rest: str, clock: Clock, options: dict) -> Machine:
    """The ``sim`` backend: ``sim`` or ``sim:PROFILE``; the profile's ``kind`` picks the model."""
    profile = load_machine_profile(rest or "linac")
    kind = profile.get("kind", "linac")
    if kind == "afterloader":
        from devices.sim.afterloader import AfterloaderFaults, SimulatedAfterloader

        return SimulatedAfterloader(profile, clock, AfterloaderFaults.from_options(options))
    if kind == "couch":
        from devices.sim.couch import SimulatedCouch

        return SimulatedCouch(profile, clock)
    return SimulatedLinac(profile, clock, options.get("interlocks"), options.get("axis_faults"))
