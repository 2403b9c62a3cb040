"""The simulated machine's imager: a CBCT of the patient where the couch now holds them.

The patient is a :class:`~devices.geometry.Volume` of anatomy in planning coordinates; the
pose is the rigid transform that maps a point of that anatomy to where it lies in the room
(isocentric coordinates). The profile's setup error gives the first pose, a couch move
composes with it, and a CBCT samples the anatomy through the pose's inverse. The imager
averages sub-voxels (partial volume, as a detector integrates) and adds seeded noise, so a
registration has to measure the pose rather than read it back.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from devices.base import CouchCorrection, ImageSet
from devices.geometry import Volume, rigid_matrix, transform_points
from devices.kept import Kept

STORED_OFFSET = 1024  # stored value = HU + 1024, the CBCT's Rescale Intercept is -1024
SUBSAMPLES = 2  # per axis, per voxel
NOISE_HU = 8.0
# Noiseless scans kept per process: a soak worker's simulated machines image one phantom
# through the same setup pose, and integrating it costs 0.1 to 0.3 CPU-seconds a CBCT.
_scans: Kept[tuple[np.ndarray, np.ndarray]] = Kept(16)


@cache
def bench_phantom() -> Volume:
    """What lies on the couch when nobody placed a patient: the product's default phantom."""
    from emulator.synth.phantom import PhantomGeometry  # the same anatomy the seeder plans on

    geometry = PhantomGeometry()
    hu = np.stack([geometry.hounsfield_slice(i) for i in range(geometry.slices)])
    origin = (geometry.origin_x, geometry.origin_y, geometry.slice_z(0))
    spacing = (geometry.pixel_spacing, geometry.pixel_spacing, geometry.slice_spacing)
    return Volume(hu, origin, spacing)


class SimulatedImager:
    """Holds the patient's anatomy and pose; images them; moves them with the couch."""

    def __init__(self, profile: dict[str, Any]) -> None:
        imaging = profile.get("imaging", {})
        self.specs = {k: v for k, v in imaging.items() if isinstance(v, dict)}
        self.setup_pose = rigid_matrix(
            tuple(imaging.get("setup_error_mm", (0, 0, 0))),
            tuple(imaging.get("setup_rotation_deg", (0, 0, 0))),
        )
        self.pose = self.setup_pose.copy()
        self.anatomy: Volume | None = None
        self._acquisitions = 0

    def lie_down(self, anatomy: Volume) -> None:
        """A patient is placed on the couch: with the profile's setup error, as each one is."""
        self.anatomy = anatomy
        self.pose = self.setup_pose.copy()

    def move(self, correction: CouchCorrection) -> None:
        """The couch carries the patient: the correction composes after the current pose."""
        self.pose = rigid_matrix(correction.translation, correction.rotation) @ self.pose

    def acquire(self, kind: str) -> ImageSet:
        spec = self.specs[kind]
        rows, slices = int(spec["rows"]), int(spec["slices"])
        spacing, dz = float(spec["pixel_spacing"]), float(spec["slice_spacing"])
        axis = (np.arange(rows) - (rows - 1) / 2) * spacing
        zs = (np.arange(slices) - (slices - 1) / 2) * dz
        anatomy = self.anatomy or bench_phantom()
        hu = _integrated_scan(anatomy, self.pose, rows, slices, (spacing, dz))
        self._acquisitions += 1
        noise = np.random.default_rng(self._acquisitions).normal(0.0, NOISE_HU, hu.shape)
        stored = np.clip(np.rint(hu + noise) + STORED_OFFSET, 0, 65535).astype(np.uint16)
        volume = stored.reshape(slices, rows, rows)
        origin = (float(axis[0]), float(axis[0]), float(zs[0]))
        return ImageSet(kind, list(volume), spacing, dz, origin)


def _integrated_scan(
    anatomy: Volume, pose: np.ndarray, rows: int, slices: int, spacing: tuple[float, float]
) -> np.ndarray:
    """The noiseless scan: each voxel the mean of its sub-voxels' anatomy, through ``pose``.

    A pure function of its inputs, kept per process (the anatomy by its array's identity,
    held in the entry so that identity cannot be reused).
    """
    key = (id(anatomy.hu), pose.tobytes(), rows, slices, spacing)
    known = _scans.get(key)
    if known is not None:
        return known[1]
    pixel, dz = spacing
    axis = (np.arange(rows) - (rows - 1) / 2) * pixel
    zs = (np.arange(slices) - (slices - 1) / 2) * dz
    grid = Volume(np.zeros((slices, rows, rows)), (axis[0], axis[0], zs[0]), (pixel,) * 2 + (dz,))
    room = grid.centres()
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES - 0.5
    to_anatomy = np.linalg.inv(pose)
    total = np.zeros(len(room))
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                points = room + np.array([ox * pixel, oy * pixel, oz * dz])
                values, _ = anatomy.sample(transform_points(to_anatomy, points))
                total += values
    hu = total / SUBSAMPLES**3
    hu.setflags(write=False)
    _scans.put(key, (anatomy.hu, hu))
    return hu
