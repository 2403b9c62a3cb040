"""The couch in its own axes: IEC 61217 table-top coordinates, and the patient's (LPS).

A registration measures how far the patient lies from the plan in DICOM patient
coordinates (LPS: x to the patient's left, y posterior, z superior). A couch moves in the
IEC 61217 table-top system (lateral X, longitudinal Y towards the gantry, vertical Z up;
pitch about X, roll about Y, yaw about Z), and which patient axis is which table axis
depends on how the patient lies (hil/PROTOCOL.md, "Units and axes"). This module is the one
place that converts, and that compares the move asked of a couch with the move it made.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.spatial.transform import Rotation

# Patient LPS vector -> table-top (X lateral, Y longitudinal, Z vertical) vector, for each
# DICOM Patient Position a linac treats: a proper rotation, so rotation vectors map alike.
PATIENT_TO_TABLE = {
    "HFS": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "HFP": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 0, -1), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
}
TRANSLATIONS = ("lateral_mm", "longitudinal_mm", "vertical_mm")
ROTATIONS = ("pitch_deg", "roll_deg", "yaw_deg")


@dataclass(frozen=True)
class TableTop:
    """Six table-top values: a relative move, or an absolute position (mm, degrees)."""

    lateral_mm: float = 0.0
    longitudinal_mm: float = 0.0
    vertical_mm: float = 0.0
    pitch_deg: float = 0.0
    roll_deg: float = 0.0
    yaw_deg: float = 0.0

    @classmethod
    def from_body(cls, body: dict) -> TableTop:
        """From a protocol body's six named fields (hil/PROTOCOL.md, Couch)."""
        return cls(**{f.name: float(body[f.name]) for f in fields(cls)})

    def as_body(self) -> dict[str, float]:
        return {f.name: round(float(getattr(self, f.name)), 6) for f in fields(self)}

    def __add__(self, other: TableTop) -> TableTop:
        return TableTop(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def __sub__(self, other: TableTop) -> TableTop:
        return TableTop(*(a - b for a, b in zip(self.values(), other.values(), strict=True)))

    def values(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, f.name)) for f in fields(self))


def _axes(patient_position: str) -> np.ndarray:
    try:
        return np.array(PATIENT_TO_TABLE[patient_position], dtype=float)
    except KeyError:
        known = ", ".join(PATIENT_TO_TABLE)
        raise ValueError(
            f"patient position {patient_position!r}: the couch knows {known}"
        ) from None


def to_table_top(
    translation: tuple[float, float, float],
    rotation: tuple[float, float, float],
    patient_position: str = "HFS",
) -> TableTop:
    """A correction in patient LPS (mm; degrees about x, then y, then z, extrinsic) as the
    same motion of the table top (hil/PROTOCOL.md: pitch, then roll, then yaw, extrinsic)."""
    axes = _axes(patient_position)
    moved = axes @ np.asarray(translation, dtype=float)
    matrix = Rotation.from_euler("xyz", rotation, degrees=True).as_matrix()
    angles = Rotation.from_matrix(axes @ matrix @ axes.T).as_euler("xyz", degrees=True)
    return TableTop(*(float(v) for v in moved), *(float(v) for v in angles))


def to_patient(
    move: TableTop, patient_position: str = "HFS"
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """A table-top motion as the patient feels it: (translation, rotation) in LPS."""
    axes = _axes(patient_position)
    values = move.values()
    translation = axes.T @ np.asarray(values[:3], dtype=float)
    matrix = Rotation.from_euler("xyz", values[3:], degrees=True).as_matrix()
    angles = Rotation.from_matrix(axes.T @ matrix @ axes).as_euler("xyz", degrees=True)
    return tuple(float(v) for v in translation), tuple(float(v) for v in angles)  # type: ignore[return-value]


def misses(
    asked: TableTop, reached: TableTop, tolerance_mm: float, tolerance_deg: float
) -> list[str]:
    """Each axis where the move reached is farther from the move asked than the tolerance,
    in words ("longitudinal 10.0 mm short of the correction")."""
    found = []
    for name, want, got in zip(
        TRANSLATIONS + ROTATIONS, asked.values(), reached.values(), strict=True
    ):
        unit, tolerance = ("mm", tolerance_mm) if name.endswith("_mm") else ("°", tolerance_deg)
        gap = got - want
        if abs(gap) > tolerance:
            side = "short of" if abs(got) < abs(want) else "past"
            if got * want < 0:
                side = "the wrong way from"
            axis = name.rsplit("_", 1)[0]
            found.append(f"{axis} {abs(gap):.1f} {unit} {side} the correction")
    return found
