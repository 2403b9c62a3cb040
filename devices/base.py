"""The treatment machine as a performing device needs it: a small :class:`Machine` and the
roles it composes (beam delivery, positioning, imaging; the afterloader's in
devices/afterloader.py).

It knows nothing of DICOM: the workflow turns plans into :class:`BeamProgram` and couch
corrections into table-top moves, and every backend (simulated, serial, TCP) answers with
the same events, so the workflow cannot tell which one it drives.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from devices.couch_axes import TableTop

if TYPE_CHECKING:
    from devices.geometry import Volume


class DeviceError(RuntimeError):
    """The device cannot do what was asked (link down, limits exceeded, not ready)."""


@dataclass(frozen=True)
class Identity:
    vendor: str
    model: str
    serial: str
    firmware: str


@dataclass(frozen=True)
class Capabilities:
    """Limits from the machine profile, checked before anything is claimed."""

    energies_mv: tuple[float, ...]
    max_dose_rate: float
    min_dose_rate: float
    mlc_leaf_pairs: int
    max_beams: int
    patient_positions: tuple[str, ...]
    gantry_speed_deg_s: float
    couch_speed_mm_s: float
    couch_limits_mm: float
    # 0 for a couch that only translates: the PPS then measures no rotation it cannot fix.
    couch_rotation_limits_deg: float = 0.0
    # How far a couch move may fall from the move asked, per axis, before no beam may be
    # turned on (AAPM TG-142: 1 mm, 0.5 degree), and how often the rest may be asked for.
    couch_tolerance_mm: float = 1.0
    couch_tolerance_deg: float = 0.5
    couch_retries: int = 1
    # How far a beam's measured meterset may be from its planned end before it is flagged.
    meterset_tolerance_mu: float = 1.0


@dataclass(frozen=True)
class ControlPointProgram:
    """One control point: where the axes are and the cumulative meterset to reach there."""

    index: int
    cumulative_meterset: float
    gantry_angle: float
    collimator_angle: float = 0.0
    jaws: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    mlc: tuple[float, ...] = ()


@dataclass(frozen=True)
class BeamProgram:
    """A beam as the machine executes it; ``start_meterset`` > 0 resumes a continuation."""

    beam_number: int
    name: str
    energy_mv: float
    dose_rate: float
    total_meterset: float
    control_points: tuple[ControlPointProgram, ...]
    start_meterset: float = 0.0
    end_meterset: float | None = None

    @property
    def stop_meterset(self) -> float:
        return self.total_meterset if self.end_meterset is None else self.end_meterset

    @property
    def start_point(self) -> ControlPointProgram:
        """Where the axes stand for beam-on (hil/PROTOCOL.md, LOAD_BEAM): control point 0
        for a new beam, for a continuation the last one at or before its start meterset."""
        if self.start_meterset <= 0:
            return self.control_points[0]
        before = [cp for cp in self.control_points if cp.cumulative_meterset <= self.start_meterset]
        return before[-1] if before else self.control_points[0]


@dataclass(frozen=True)
class AxisState:
    """Where the machine's axes are now, as the controller reports them."""

    gantry_angle: float
    collimator_angle: float
    jaws: tuple[float, float, float, float]
    mlc: tuple[float, ...]
    couch: TableTop = field(default_factory=TableTop)

    def differences(
        self, cp: ControlPointProgram, angle_tol: float = 0.1, position_tol: float = 0.5
    ) -> list[str]:
        """Axes that are not where control point ``cp`` puts them (verify before beam on)."""
        problems = []
        if abs((self.gantry_angle - cp.gantry_angle + 180) % 360 - 180) > angle_tol:
            problems.append(f"gantry at {self.gantry_angle}, planned {cp.gantry_angle}")
        if abs((self.collimator_angle - cp.collimator_angle + 180) % 360 - 180) > angle_tol:
            problems.append(f"collimator at {self.collimator_angle}, planned {cp.collimator_angle}")
        if any(abs(a - b) > position_tol for a, b in zip(self.jaws, cp.jaws, strict=True)):
            problems.append("jaws not at their planned positions")
        if len(self.mlc) != len(cp.mlc) or any(
            abs(a - b) > position_tol for a, b in zip(self.mlc, cp.mlc, strict=True)
        ):
            problems.append("MLC not at its planned positions")
        return problems


class Termination(str, enum.Enum):
    NORMAL = "NORMAL"
    OPERATOR = "OPERATOR"
    MACHINE = "MACHINE"
    # The host lost the machine with the beam on and could not read its count back: the
    # meterset is the last one heard, and the TMS must have the session reviewed.
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class MetersetTick:
    """Delivered meterset so far in this beam (cumulative, from the start of the beam)."""

    meterset: float
    dose_rate: float


@dataclass(frozen=True)
class ControlPointReached:
    """Delivery passed control point ``index`` (the segment before it is complete)."""

    index: int
    meterset: float
    gantry_angle: float


@dataclass(frozen=True)
class BeamEnded:
    """The beam stopped; ``meterset`` is what the dosimetry channel measured, never more."""

    meterset: float
    termination: Termination
    reason: str = ""
    interlock_code: str = ""


DeliveryEvent = MetersetTick | ControlPointReached | BeamEnded


@dataclass(frozen=True)
class MachineDelivery:
    """The machine's own count of its last beam-on, which it keeps across a host restart."""

    beam_number: int
    start_meterset: float
    meterset: float
    termination: str


@dataclass(frozen=True)
class CouchCorrection:
    """A 6-DOF correction as a registration measures it: translations in mm, rotations in
    degrees about x, then y, then z (extrinsic), in patient LPS axes. The couch is moved in
    its own axes (:func:`devices.couch_axes.to_table_top`)."""

    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class ImageSet:
    """Images an acquisition returned: voxel values plus their geometry."""

    kind: str
    pixels: list = field(default_factory=list)
    pixel_spacing: float = 1.0
    slice_spacing: float = 1.0
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)


# Told how far a long operation is: its name (e.g. "ACQUIRE") and the share done, 0 to 1.
OperationProgress = Callable[[str, float], None]


class Machine(ABC):
    """One treatment machine behind one link, whichever backend implements it: what every
    machine does (connect, say who it is and what it can do, report long operations).

    What it treats with is a role it composes (python-can keeps its bus this small, and
    lewis its devices apart from their interfaces): :class:`BeamDeliverer`,
    :class:`Positioner`, :class:`Imager`, :class:`devices.afterloader.Afterloader`. A step
    asks for the role it needs (:func:`role`), so a machine without it is refused in words
    before any UPS is claimed.
    """

    _progress_listener: OperationProgress | None = None

    def watch_progress(self, listener: OperationProgress | None) -> None:
        """Who is told the share done of each long operation (an acquisition) as the machine
        reports it: the workflow's RO-26 reports. A backend that reports none tells nobody."""
        self._progress_listener = listener

    def _report_progress(self, operation: str, share: float) -> None:
        listener = self._progress_listener
        if listener is not None:
            listener(operation, min(max(share, 0.0), 1.0))

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def identify(self) -> Identity: ...

    def capabilities(self) -> Capabilities:
        """The machine's limits (a linac's energies and dose rates, a couch's travel and the
        tolerances the host holds it to); a machine with none of these states none."""
        return Capabilities((), 0.0, 0.0, 0, 0, (), 0.0, 0.0, 0.0)

    def roles(self) -> frozenset[type]:
        """The roles this machine offers: by default the role classes it derives from. A
        backend that learns what it drives only when connected (a controller link) says."""
        return frozenset(c for c in type(self).__mro__ if c.__dict__.get("is_role", False))

    def last_delivery(self) -> MachineDelivery | None:
        """The last beam-on as the machine counted it, if it outlives the host process.

        A controller in its own box does, and so it can tell a restarted host how far a
        beam got after the host stopped hearing; an in-process simulator dies with the
        host and has nothing to tell (None).
        """
        return None

    def __enter__(self) -> Machine:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The name drivers written before the roles split know the base class by.
Device = Machine


class BeamDeliverer(ABC):
    """The external-beam role: loads a beam's program and delivers it."""

    is_role = True
    does = "deliver external beams"

    @abstractmethod
    def load_beam(self, beam: BeamProgram) -> None:
        """Sends the beam and sets the axes where it starts; raises if out of limits."""

    @abstractmethod
    def beam_on(self) -> Iterator[DeliveryEvent]:
        """Delivers the loaded beam; the last event is always a :class:`BeamEnded`."""

    @abstractmethod
    def interrupt(self, reason: str) -> None:
        """Operator beam hold: the running delivery ends with OPERATOR termination."""

    def axes(self) -> AxisState:
        """The controller's report of where its axes are."""
        raise DeviceError(f"{type(self).__name__} reports no axes")


class Positioner(ABC):
    """The patient-positioning role: a couch that moves by a correction and says where it is."""

    is_role = True
    does = "move the couch"

    @abstractmethod
    def move_couch(self, move: TableTop) -> TableTop:
        """Moves the table top by ``move`` (relative, IEC 61217 table-top axes) and returns
        where it is now, as its encoders measured (absolute); the caller compares."""

    def couch_position(self) -> TableTop:
        """Where the table top is (absolute, IEC 61217 table-top axes), as last measured."""
        return TableTop()


class Imager(ABC):
    """The imaging role: acquisitions of the patient where the couch holds them."""

    is_role = True
    does = "image the patient"

    @abstractmethod
    def acquire(self, kind: str) -> ImageSet:
        """Triggers an imaging acquisition (e.g. 'CBCT') and returns the images."""

    def place_patient(self, anatomy: Volume, patient_position: str = "HFS") -> None:
        """Tells a simulator whose anatomy lies on the couch (the planning CT's patient), and
        how (DICOM Patient Position: which table axis is which patient axis).

        A real machine images the real patient, so a real backend ignores this; a simulator
        without it would image something other than the patient the PPS registers against.
        """
        return None


R = TypeVar("R")


def role(machine: Machine, wanted: type[R]) -> R:
    """``machine`` as the role a step needs, or a DeviceError that says what it lacks."""
    if wanted in machine.roles():
        return machine  # type: ignore[return-value]
    name = machine.identify().model if hasattr(machine, "identify") else type(machine).__name__
    raise DeviceError(f"the machine ({name}) cannot {getattr(wanted, 'does', wanted.__name__)}")
