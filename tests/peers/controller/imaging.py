"""The CBCT imager: what the anatomy on the couch looks like, in the DICOM patient
coordinates (LPS) of the planning CT (PROTOCOL.md, Images).

The anatomy is the planning CT, a volume in its own DICOM patient coordinates.  The rig
puts the machine's isocentre at ``isocenter`` of the planning CT: by the document the
planning CT's origin (0, 0, 0), unless a rig configuration says otherwise.  A patient lying
as planned has that point at the isocentre, so the planning CT's coordinates are the
room's, shifted by ``isocenter``.  On the couch the patient carries a setup error (a
rotation about the isocentre, x then y then z extrinsic, then a translation, LPS) and then
every couch move (the table top's rigid motion in LPS for the patient position):
``p = R_couch (R_setup u + t_setup) + d_couch`` with ``u = q - isocenter`` and ``p`` relative
to the isocentre.  The imager reconstructs a grid centred on the isocentre and reports it in
planning-CT coordinates, ``origin`` shifted by ``isocenter``: the voxel at planning-CT
point ``x`` (room point ``p = x - isocenter``) shows the CT at ``q = R^T (p - t) + isocenter``.
A patient lying exactly as planned (no setup error, no couch move) is imaged as the
planning CT itself: registering it against the planning CT gives the identity.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .framing import MAX_BODY, body_bytes

AIR_HU = -1000.0


class Anatomy:
    """A HU volume indexed ``[k, j, i]`` with ``position = origin + A @ (i, j, k)`` (LPS).

    ``isocenter``: the point of the planning CT the rig puts at the machine's isocentre
    (None: the planning CT's origin, (0, 0, 0), as PROTOCOL.md's Images section has it;
    ``"plan"``: ``plan_isocenter``, the RT Plan's isocentre when one came with the CT).
    """

    def __init__(
        self,
        volume: np.ndarray,
        origin,
        axes: np.ndarray,
        isocenter=None,
        plan_isocenter=None,
    ) -> None:
        self.volume = np.ascontiguousarray(volume, dtype=np.float32)
        self.origin = np.asarray(origin, dtype=float).reshape(3)
        self.axes = np.asarray(axes, dtype=float).reshape(3, 3)  # columns: i, j, k steps
        self._inverse = np.linalg.inv(self.axes)
        self.plan_isocenter = (
            None if plan_isocenter is None else np.asarray(plan_isocenter, float).reshape(3)
        )
        self.isocenter = np.zeros(3)
        self.set_isocenter(isocenter)

    def set_isocenter(self, isocenter) -> None:
        """Where the rig puts the machine's isocentre in the planning CT (see the class)."""
        if isocenter is None:
            isocenter = (0.0, 0.0, 0.0)
        elif isinstance(isocenter, str):
            if isocenter != "plan":
                raise ValueError(f"isocenter {isocenter!r}: a point (LPS, mm) or 'plan'")
            if self.plan_isocenter is None:
                raise ValueError("isocenter 'plan': no RT Plan came with this anatomy")
            isocenter = self.plan_isocenter
        self.isocenter = np.asarray(isocenter, dtype=float).reshape(3)

    @classmethod
    def from_array(cls, volume, origin, spacing, isocenter=None) -> Anatomy:
        """``volume[z, y, x]`` HU, ``origin`` the first voxel centre (x, y, z), spacing x, y, z."""
        sx, sy, sz = (float(v) for v in spacing)
        return cls(np.asarray(volume), origin, np.diag([sx, sy, sz]), isocenter)

    @classmethod
    def from_dicom_dir(cls, directory: str | Path, isocenter=None) -> Anatomy:
        """A CT series (the largest in the directory); an RT Plan there gives
        ``plan_isocenter`` (used with ``isocenter="plan"``)."""
        import pydicom

        series: dict[str, list[Any]] = {}
        plan_iso = None
        for path in sorted(Path(directory).rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:
                continue
            modality = str(getattr(ds, "Modality", ""))
            if modality == "RTPLAN" and plan_iso is None:
                try:
                    cp0 = ds.BeamSequence[0].ControlPointSequence[0]
                    plan_iso = [float(v) for v in cp0.IsocenterPosition]
                except (AttributeError, IndexError, KeyError):
                    pass
                continue
            if modality not in ("CT", "") or "ImagePositionPatient" not in ds:
                continue
            series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(path)
        if not series:
            raise ValueError(f"no CT images in {directory}")
        paths = max(series.values(), key=len)
        slices = [pydicom.dcmread(p, force=True) for p in paths]
        iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        row_dir, col_dir = iop[:3], iop[3:]
        normal = np.cross(row_dir, col_dir)
        slices.sort(key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, dtype=float)))
        row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
        first = np.array([float(v) for v in slices[0].ImagePositionPatient])
        if len(slices) > 1:
            last = np.array([float(v) for v in slices[-1].ImagePositionPatient])
            k_step = (last - first) / (len(slices) - 1)
        else:
            k_step = normal * float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
        planes = []
        for ds in slices:
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            planes.append(ds.pixel_array.astype(np.float32) * slope + intercept)
        axes = np.column_stack([row_dir * col_spacing, col_dir * row_spacing, k_step])
        return cls(np.stack(planes), first, axes, isocenter, plan_iso)

    @classmethod
    def phantom(cls) -> Anatomy:
        """A water cylinder (elliptic, 300 x 220 mm) with a spine, lungs and two bone balls,
        isocentre at 0: enough structure for a 6-DOF registration."""
        spacing = 2.0
        xs = np.arange(-200.0, 200.0 + 1e-9, spacing)
        ys = np.arange(-160.0, 160.0 + 1e-9, spacing)
        zs = np.arange(-90.0, 90.0 + 1e-9, spacing)
        z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
        vol = np.full(z.shape, AIR_HU, dtype=np.float32)
        vol[(x / 150.0) ** 2 + (y / 110.0) ** 2 <= 1.0] = 0.0
        vol[((x - 70.0) / 45.0) ** 2 + ((y + 5.0) / 60.0) ** 2 + (z / 80.0) ** 2 <= 1.0] = -750.0
        vol[((x + 70.0) / 40.0) ** 2 + ((y + 5.0) / 55.0) ** 2 + ((z - 10) / 70) ** 2 <= 1] = -750
        vol[(x**2 + (y - 70.0) ** 2 <= 15.0**2) & (np.abs(z) <= 80.0)] = 700.0
        vol[(x - 35.0) ** 2 + (y + 45.0) ** 2 + (z - 20.0) ** 2 <= 12.0**2] = 900.0
        vol[(x + 30.0) ** 2 + (y - 20.0) ** 2 + (z + 25.0) ** 2 <= 9.0**2] = 800.0
        return cls.from_array(vol, (xs[0], ys[0], zs[0]), (spacing, spacing, spacing), (0, 0, 0))

    def sample(self, points: np.ndarray) -> np.ndarray:
        """HU at patient positions ``points`` (N x 3), linear interpolation, air outside."""
        ijk = self._inverse @ (points - self.origin).T
        coords = np.stack([ijk[2], ijk[1], ijk[0]])
        return ndimage.map_coordinates(self.volume, coords, order=1, mode="constant", cval=AIR_HU)


@dataclass(frozen=True)
class CbctGeometry:
    """The CBCT grid, centred on the machine's isocentre; ``origin`` and ``points`` are
    relative to it (the IMAGES ``origin`` adds where the isocentre is in the planning CT)."""

    rows: int = 64
    columns: int = 64
    planes: int = 24
    pixel_spacing: float = 6.0
    slice_spacing: float = 2.5

    @property
    def origin(self) -> list[float]:
        return [
            -(self.columns - 1) / 2 * self.pixel_spacing,
            -(self.rows - 1) / 2 * self.pixel_spacing,
            -(self.planes - 1) / 2 * self.slice_spacing,
        ]

    def points(self) -> np.ndarray:
        """Voxel centres (planes x rows x columns, 3): plane = z, row = y, column = x."""
        ox, oy, oz = self.origin
        zs = oz + np.arange(self.planes) * self.slice_spacing
        ys = oy + np.arange(self.rows) * self.pixel_spacing
        xs = ox + np.arange(self.columns) * self.pixel_spacing
        z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
        return np.stack([x, y, z], axis=-1)


def acquire(
    anatomy: Anatomy,
    geometry: CbctGeometry,
    rotation: np.ndarray,
    translation: np.ndarray,
    rng: np.random.Generator,
    noise_hu: float = 4.0,
) -> np.ndarray:
    """The stored volume (uint16, HU + 1024) as [plane, row, column]."""
    p = geometry.points().reshape(-1, 3)
    u = (p - np.asarray(translation)) @ np.asarray(rotation)  # rows: R^T (p - t)
    hu = anatomy.sample(u + anatomy.isocenter)
    hu = hu + rng.normal(0.0, noise_hu, hu.shape)
    stored = np.clip(np.rint(hu + 1024.0), 0, 65535).astype("<u2")
    return stored.reshape(geometry.planes, geometry.rows, geometry.columns)


def images_bodies(
    stored: np.ndarray,
    geometry: CbctGeometry,
    kind: str = "CBCT",
    max_planes_per_frame: int | None = None,
    isocenter=(0.0, 0.0, 0.0),
) -> list[dict[str, Any]]:
    """IMAGES bodies: as many whole planes as fit in a 1 MiB body, in plane order; the
    geometry in planning-CT coordinates, the grid's ``origin`` shifted by ``isocenter``."""
    origin = np.asarray(geometry.origin, dtype=float) + np.asarray(isocenter, dtype=float)
    header: dict[str, Any] = {
        "kind": kind,
        "encoding": "uint16le-hu1024",
        "rows": geometry.rows,
        "columns": geometry.columns,
        "planes_total": geometry.planes,
        "pixel_spacing": float(geometry.pixel_spacing),
        "slice_spacing": float(geometry.slice_spacing),
        "origin": [round(float(v), 6) for v in origin],
    }
    encoded = [base64.b64encode(plane.astype("<u2").tobytes()).decode("ascii") for plane in stored]
    base = len(body_bytes({**header, "first_plane": geometry.planes, "planes": []}))
    bodies: list[dict[str, Any]] = []
    first = 0
    while first < len(encoded):
        size = base
        count = 0
        while first + count < len(encoded):
            extra = len(json.dumps(encoded[first + count])) + (1 if count else 0)
            if size + extra > MAX_BODY:
                break
            if max_planes_per_frame is not None and count >= max_planes_per_frame:
                break
            size += extra
            count += 1
        if count == 0:
            raise ValueError("one plane does not fit in a 1 MiB body")
        bodies.append({**header, "first_plane": first, "planes": encoded[first : first + count]})
        first += count
    return bodies
