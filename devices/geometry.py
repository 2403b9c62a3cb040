"""Patient-space geometry shared by the simulated imager and the registration.

A :class:`Volume` is voxels in Hounsfield units on an axial grid (patient LPS, mm); a rigid
transform is a 4x4 matrix built from three translations (mm) and three rotations (degrees,
about the patient x, y and z axes, applied in that order). The simulated machine images a
volume through the pose the patient lies in; the PPS measures the inverse of that pose. Both
sides use these helpers, and scipy's, so "a rotation of 1 degree about y" means one thing.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates, spline_filter
from scipy.spatial.transform import Rotation

AIR_HU = -1000.0


@dataclass(frozen=True)
class Volume:
    """Voxels ``hu[z, y, x]`` whose first centre lies at ``origin`` (x, y, z)."""

    hu: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # x, y, z in mm
    # ``hu`` holds cubic B-spline coefficients (see :meth:`as_spline`), not voxel values.
    spline: bool = False

    def as_spline(self) -> Volume:
        """The same volume sampled by cubic B-spline: no bias towards voxel centres.

        Trilinear sampling smooths more between voxel centres than on them, which pulls a
        least-squares registration towards whole-voxel shifts; the spline does not. The
        coefficients are computed once here, not on every sample.
        """
        coefficients = spline_filter(self.hu, order=3, mode="nearest")
        return Volume(coefficients, self.origin, self.spacing, spline=True)

    def centres(self) -> np.ndarray:
        """Every voxel centre as an (N, 3) array of x, y, z, in ``hu.ravel()`` order."""
        nz, ny, nx = self.hu.shape
        z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(float)
        return np.asarray(self.origin) + index * np.asarray(self.spacing)

    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values at (N, 3) points (x, y, z), and which points fell inside the grid.

        Outside the grid is air: a patient does not continue past the scanned length, but
        the caller must know, so the mask says where the value was measured.
        """
        index = (points - np.asarray(self.origin)) / np.asarray(self.spacing)
        upper = np.array(self.hu.shape[::-1], dtype=float) - 1
        inside = np.all((index >= 0) & (index <= upper), axis=1)
        values = map_coordinates(
            self.hu,
            index[:, ::-1].T,
            order=3 if self.spline else 1,
            mode="nearest" if self.spline else "constant",
            cval=AIR_HU,
            prefilter=False,
        )
        if self.spline:
            values[~inside] = AIR_HU
        return values, inside


def rigid_matrix(
    translation: tuple[float, float, float], rotation_deg: tuple[float, float, float]
) -> np.ndarray:
    """p' = R p + t as a 4x4 matrix; R rotates about x, then y, then z (extrinsic)."""
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    matrix[:3, 3] = translation
    return matrix


def rigid_parameters(
    matrix: np.ndarray,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The translation (mm) and rotations (degrees) :func:`rigid_matrix` builds ``matrix`` from."""
    angles = Rotation.from_matrix(matrix[:3, :3]).as_euler("xyz", degrees=True)
    translation = tuple(float(v) for v in matrix[:3, 3])
    return translation, tuple(float(v) for v in angles)  # type: ignore[return-value]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 3) points through a 4x4 rigid matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def volume_body(volume: Volume) -> dict:
    """A volume as JSON can carry it (a simulator's control channel): HU rounded to int16,
    zlib-compressed, base64; the geometry beside it."""
    data = np.clip(np.rint(volume.hu), -32768, 32767).astype("<i2")
    return {
        "shape": list(data.shape),
        "origin": [float(v) for v in volume.origin],
        "spacing": [float(v) for v in volume.spacing],
        "hu_int16_zlib": base64.b64encode(zlib.compress(data.tobytes(), 6)).decode("ascii"),
    }


def volume_from_body(body: dict) -> Volume:
    """The volume :func:`volume_body` wrote."""
    raw = zlib.decompress(base64.b64decode(body["hu_int16_zlib"]))
    hu = np.frombuffer(raw, dtype="<i2").reshape(tuple(int(n) for n in body["shape"]))
    return Volume(
        hu.astype(float),
        tuple(float(v) for v in body["origin"]),  # type: ignore[arg-type]
        tuple(float(v) for v in body["spacing"]),  # type: ignore[arg-type]
    )
