"""A numpy body phantom: its geometry is shared by the CT voxels and the contours.

The structures, plan and dose are all derived from the same :class:`PhantomGeometry`, so
the PTV contour, the isocenter point and the beam apertures agree with what the CT shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhantomGeometry:
    """Patient coordinates (LPS, mm) of the CT grid and of the anatomy drawn in it."""

    rows: int = 128
    columns: int = 128
    pixel_spacing: float = 3.0
    slices: int = 40
    slice_spacing: float = 2.5
    body_semi_axes: tuple[float, float] = (170.0, 110.0)
    lung_centres_x: tuple[float, float] = (-75.0, 75.0)
    lung_semi_axes: tuple[float, float] = (45.0, 60.0)
    spine_centre_y: float = 75.0
    spine_radius: float = 15.0
    ptv_radius: float = 30.0
    ptv_centre_y: float = -20.0
    # Vertebrae and the discs between them: the one structure that repeats along z, so a
    # CBCT shows where along the patient it was taken (registration needs every axis).
    vertebra_pitch: float = 27.0
    disc_thickness: float = 7.0

    def __post_init__(self) -> None:
        if self.rows < 16 or self.columns < 16:
            raise ValueError("the CT needs at least 16 rows and 16 columns")
        if self.slices < 3:
            raise ValueError("the CT needs at least 3 slices")
        if self.pixel_spacing <= 0 or self.slice_spacing <= 0:
            raise ValueError("pixel and slice spacing must be positive")
        half_width = self.columns * self.pixel_spacing / 2
        if self.body_semi_axes[0] >= half_width:
            # Shrink the anatomy rather than clip it, so EXTERNAL stays inside the image.
            # Scaled values are rounded so they stay within DS's 16 characters.
            scale = 0.85 * half_width / self.body_semi_axes[0]

            def scaled(*values: float) -> tuple[float, ...]:
                return tuple(round(v * scale, 3) for v in values)

            for name in ("body_semi_axes", "lung_centres_x", "lung_semi_axes"):
                object.__setattr__(self, name, scaled(*getattr(self, name)))
            for name in (
                "spine_centre_y",
                "spine_radius",
                "ptv_radius",
                "ptv_centre_y",
                "vertebra_pitch",
                "disc_thickness",
            ):
                object.__setattr__(self, name, scaled(getattr(self, name))[0])

    @property
    def origin_x(self) -> float:
        """x of the centre of the first column."""
        return -(self.columns - 1) * self.pixel_spacing / 2

    @property
    def origin_y(self) -> float:
        return -(self.rows - 1) * self.pixel_spacing / 2

    def slice_z(self, index: int) -> float:
        """z of slice ``index``; slices are centred on z = 0."""
        return round((index - (self.slices - 1) / 2) * self.slice_spacing, 3)

    @property
    def isocenter(self) -> tuple[float, float, float]:
        """The PTV centre, placed on the slice nearest z = 0 so the POINT lies on an image."""
        return (0.0, round(self.ptv_centre_y, 3), self.slice_z(self.slices // 2))

    def ptv_radius_at(self, z: float) -> float:
        dz = z - self.isocenter[2]
        return math.sqrt(self.ptv_radius**2 - dz**2) if abs(dz) < self.ptv_radius else 0.0

    def is_disc(self, z: float) -> bool:
        """Whether the spine at ``z`` is an intervertebral disc rather than bone."""
        return (z + self.disc_thickness / 2) % self.vertebra_pitch < self.disc_thickness

    def hounsfield_slice(self, index: int) -> np.ndarray:
        """One axial slice in HU: air, soft tissue body, lungs, vertebra or disc, denser PTV."""
        xs = self.origin_x + np.arange(self.columns) * self.pixel_spacing
        ys = self.origin_y + np.arange(self.rows) * self.pixel_spacing
        x, y = np.meshgrid(xs, ys)
        hu = np.full((self.rows, self.columns), -1000.0)
        a, b = self.body_semi_axes
        body = (x / a) ** 2 + (y / b) ** 2 <= 1.0
        hu[body] = 40.0
        la, lb = self.lung_semi_axes
        for cx in self.lung_centres_x:
            hu[((x - cx) / la) ** 2 + (y / lb) ** 2 <= 1.0] = -750.0
        spine = (x**2 + (y - self.spine_centre_y) ** 2) <= self.spine_radius**2
        hu[spine] = 100.0 if self.is_disc(self.slice_z(index)) else 700.0
        r = self.ptv_radius_at(self.slice_z(index))
        if r > 0:
            hu[(x**2 + (y - self.ptv_centre_y) ** 2) <= r**2] = 60.0
        return hu


def ellipse_points(
    semi_x: float, semi_y: float, z: float, n: int, centre: tuple[float, float] = (0.0, 0.0)
) -> list[float]:
    """A closed planar polygon as flat Contour Data (x, y, z triplets)."""
    points: list[float] = []
    for k in range(n):
        angle = 2 * math.pi * k / n
        points += [
            round(centre[0] + semi_x * math.cos(angle), 2),
            round(centre[1] + semi_y * math.sin(angle), 2),
            z,
        ]
    return points
