"""Measures where the patient lies: a rigid CBCT-to-planning-CT registration in 6 DOF.

The PPS must find translation along all three axes and the rotations its couch can
correct, from the images alone. It minimises the mean squared HU difference between the
CBCT and the planning CT resampled through a candidate transform, first on smoothed
volumes (a wide capture range) and then on the originals (precision), over a fixed
sample of CBCT voxels weighted towards edges (where position is visible).

scipy does the work: ``ndimage`` resamples and smooths, ``optimize.minimize`` (Powell, no
gradients needed) searches. It is the well-kept numerical library numpy users already
have; SimpleITK would add a 50 MB wheel for the same mono-modal rigid problem. Powell's
line searches are what find the right disc along z: a short planning CT shows a disc or two
of a column that repeats every 27 mm, and Levenberg-Marquardt (tried for [5/7], 4 to 7
times fewer resamplings) settled on the wrong one, measuring a 12 mm setup error on an
8-slice CT as 7 mm (tests/test_hil_safety.py).

The planning CT's side of the work (decoding, smoothing to the CBCT's resolution, spline
coefficients) depends on the planning CT and the CBCT's voxel size only:
:func:`prepared_planning` does it once and keeps it for the next session, or the next
device of a soak worker, that registers against the same series.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from scipy.ndimage import gaussian_filter
from scipy.optimize import minimize

from devices.geometry import Volume, rigid_matrix, rigid_parameters, transform_points
from devices.kept import Kept

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAMPLE_POINTS = 4_000  # 12,000 took 4x the CPU for no better residual (0.1 mm either)
MAX_TRANSLATION_MM = 60.0
MAX_ROTATION_DEG = 10.0
MIN_OVERLAP = 0.3  # of the sampled CBCT voxels, inside the planning CT
# At the best fit, the planning CT and the CBCT of the same patient correlate 0.95 or more
# voxel by voxel (0.75 for a 6-slice 48 x 48 CT); another patient's, or the bench phantom
# instead of the patient, 0.3 to 0.4. A fit below this is no registration: the step is
# canceled rather than the couch moved by it.
MIN_CORRELATION = 0.6
# Pitch and roll (about x and y) show as a slope along z: over a slab thinner than this the
# slope is noise (a soak's 8-slice planning CT gave spurious 3-degree tilts), so only the
# translations and the rotation about z are measured.
MIN_TILT_OVERLAP_MM = 40.0
# Coarse to fine: smoothing (mm) widens the capture range, the last stage is exact. Two
# stages reach the same residual (under 0.1 mm, 0.1 degree) as four in a quarter of the time:
# a fleet of PPS registers a CBCT per session.
STAGES = ((6.0, 0.05), (0.0, 0.01))
# Prepared planning CTs kept per process, and the largest kept (voxels): a soak's small CTs
# are shared by its devices; a 200-slice 512 x 512 CT is prepared per use, not held.
PREPARED_MAX_VOXELS = 16_000_000


class RegistrationError(ValueError):
    """The images cannot be registered (geometry the registration does not handle)."""


@dataclass(frozen=True)
class RigidRegistration:
    """``matrix`` maps CBCT (room) coordinates to planning coordinates, as RO-23 stores it."""

    matrix: np.ndarray
    mean_squared_hu: float
    evaluations: int
    correlation: float = 1.0  # of the two images' voxels at the best fit

    @property
    def correction(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The couch move that brings the patient to the plan: the same transform."""
        return rigid_parameters(self.matrix)


@dataclass(frozen=True)
class PreparedPlanning:
    """The planning CT as every registration against one CBCT geometry compares with it."""

    volume: Volume
    exact: Volume  # spline coefficients at the CBCT's resolution: the last stage's target
    smoothed: dict[float, Volume] = field(default_factory=dict)  # coarse stages' targets

    @classmethod
    def of(cls, planning: Volume, cbct_spacing: tuple[float, float, float]) -> PreparedPlanning:
        # The CBCT's voxels average over more tissue than the planning CT's: compare the
        # planning CT at the CBCT's resolution, or every edge is a mismatch.
        at_cbct = _smoothed(planning, _resolution_gap(planning.spacing, cbct_spacing))
        # (Trilinear sampling of the smoothed images, a fifth of the spline's cost, lost the
        # 40-slice CT's z in benchmarks/registration.py: cubic splines for both stages.)
        smoothed = {
            sigma: _smoothed(at_cbct, (sigma,) * 3).as_spline() for sigma, _ in STAGES if sigma
        }
        return cls(planning, at_cbct.as_spline(), smoothed)


_prepared: Kept[PreparedPlanning] = Kept(4)
_measured: Kept[RigidRegistration | RegistrationError] = Kept(64)


def prepared_planning(
    images: Sequence[Dataset], cbct_spacing: tuple[float, float, float], key: bytes = b""
) -> PreparedPlanning:
    """The planning CT series prepared for a CBCT of ``cbct_spacing``, from the process's
    cache when a series of the same voxels was prepared (``key``: its :func:`series_key`,
    computed here when the caller has not)."""
    kept_as = (key or series_key(images), tuple(cbct_spacing))
    prepared = _prepared.get(kept_as)
    if prepared is None:
        prepared = PreparedPlanning.of(volume_from_images(list(images)), cbct_spacing)
        if prepared.volume.hu.size <= PREPARED_MAX_VOXELS:
            _prepared.put(kept_as, prepared)
    return prepared


def planning_volume(images: Sequence[Dataset]) -> Volume:
    """The planning CT's voxels, decoded once per series while a prepared copy is kept."""
    wanted = series_key(images)
    for (key, _spacing), prepared in _prepared.items():
        if key == wanted:
            return prepared.volume
    return volume_from_images(list(images))


def series_key(images: Sequence[Dataset]) -> bytes:
    """A SHA-256 of what :func:`volume_from_images` reads (pixel data, position,
    orientation, spacing, rescale), without decoding: two series with this key are the
    same voxels in the same place, whatever their UIDs (a soak's patients are one phantom
    under many names)."""
    digest = hashlib.sha256()
    for ds in sorted(images, key=lambda ds: float(ds.ImagePositionPatient[2])):
        geometry = (
            ds.ImagePositionPatient,
            ds.ImageOrientationPatient,
            ds.PixelSpacing,
            ds.get("RescaleSlope", 1),
            ds.get("RescaleIntercept", 0),
            ds.Rows,
            ds.Columns,
            ds.BitsAllocated,
            ds.PixelRepresentation,
        )
        digest.update(repr(tuple(str(v) for v in geometry)).encode())
        digest.update(ds.PixelData)
    return digest.digest()


def register_series(
    planning_images: Sequence[Dataset], cbct: Volume, rotations: bool = True
) -> RigidRegistration:
    """:func:`register_rigid` of a planning CT series and a CBCT, measured once per process
    for the same inputs: a soak worker's simulated devices treating one patient image the
    same voxels (the simulator's noise is seeded per acquisition), and a registration is a
    pure function of them. The key is :func:`series_key` of the planning CT and a SHA-256
    of the CBCT's voxels and geometry: only identical images share a result (or a refusal).
    """
    planning_key = series_key(planning_images)
    digest = hashlib.sha256(np.ascontiguousarray(cbct.hu).tobytes())
    digest.update(repr((cbct.origin, cbct.spacing, cbct.hu.shape)).encode())
    key = (planning_key, digest.digest(), rotations)
    known = _measured.get(key)
    if known is None:
        try:
            prepared = prepared_planning(planning_images, cbct.spacing, planning_key)
            known = register_rigid(prepared, cbct, rotations)
        except RegistrationError as error:
            known = error
        _measured.put(key, known)
    if isinstance(known, RegistrationError):
        raise RegistrationError(str(known))
    return known


def volume_from_images(images: list[Dataset]) -> Volume:
    """An axial image series as HU voxels; refuses what it would misplace."""
    if not images:
        raise RegistrationError("no images to register")
    ordered = sorted(images, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for ds in ordered:
        orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
        if not np.allclose(orientation, AXIAL, atol=1e-4):
            raise RegistrationError(f"image {ds.SOPInstanceUID} is not axial: {orientation}")
    zs = np.array([float(ds.ImagePositionPatient[2]) for ds in ordered])
    steps = np.diff(zs)
    if len(zs) > 1 and (steps.min() <= 0 or not np.allclose(steps, steps[0], atol=0.01)):
        raise RegistrationError("slices are not evenly spaced along z")
    dz = float(steps[0]) if len(zs) > 1 else float(ordered[0].get("SliceThickness", 1.0))
    hu = np.stack(
        [
            ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1))
            + float(ds.get("RescaleIntercept", 0))
            for ds in ordered
        ]
    )
    dy, dx = (float(v) for v in ordered[0].PixelSpacing)
    x0, y0 = (float(v) for v in ordered[0].ImagePositionPatient[:2])
    return Volume(hu, (x0, y0, float(zs[0])), (dx, dy, dz))


def _sample_points(cbct: Volume, planning: Volume) -> tuple[np.ndarray, np.ndarray]:
    """CBCT voxel centres and values: where HU changes most along each axis, and some more.

    Only voxels the planning CT also covers count (a CBCT is often longer or wider than
    the planning scan). A quarter of the points per axis where that axis' gradient is
    largest, so the few structures that show position along z (discs, the PTV's poles)
    weigh as much as the many that show x and y; a quarter at random keeps the rest of the
    anatomy in view.
    """
    centres = cbct.centres()
    _, overlap = planning.sample(centres)
    candidates = np.flatnonzero(overlap)
    if candidates.size < 1000:
        raise RegistrationError("the CBCT and the planning CT do not overlap")
    count = min(SAMPLE_POINTS, candidates.size)
    rng = np.random.default_rng(0)
    chosen = [rng.choice(candidates, size=count // 4, replace=False)]
    for gradient in np.gradient(cbct.hu, *cbct.spacing[::-1]):
        strength = np.abs(gradient).ravel()[candidates]
        chosen.append(candidates[np.argsort(strength)[-(count // 4) :]])
    unique = np.unique(np.concatenate(chosen))
    return centres[unique], cbct.hu.ravel()[unique]


def register_rigid(
    planning: Volume | PreparedPlanning, cbct: Volume, rotations: bool = True
) -> RigidRegistration:
    """The CBCT-to-planning transform; rotations only when the couch can correct them, and
    pitch and roll only when the scans overlap along enough of the patient to show them."""
    if isinstance(planning, Volume):
        planning = PreparedPlanning.of(planning, cbct.spacing)
    prepared, planning = planning, planning.volume
    points, values = _sample_points(cbct, planning)
    evaluations = 0
    tilts = rotations and _overlap_length(planning, cbct) >= MIN_TILT_OVERLAP_MM
    free = np.array([True, True, True, tilts, tilts, rotations])

    def matrix_of(params: np.ndarray) -> np.ndarray:
        every = np.zeros(6)
        every[free] = params
        return rigid_matrix(tuple(every[:3]), tuple(every[3:]))

    def mean_square(params: np.ndarray, target: Volume, observed: np.ndarray) -> float:
        """The mean squared HU difference over the covered points (1e12: too few)."""
        nonlocal evaluations
        evaluations += 1
        sampled, inside = target.sample(transform_points(matrix_of(params), points))
        if inside.mean() < MIN_OVERLAP:
            return 1e12
        return float(np.mean((sampled[inside] - observed[inside]) ** 2))

    params = np.zeros(int(free.sum()))
    exact = prepared.exact  # the last stage's target and the final cost's
    for sigma_mm, tolerance in STAGES:
        target, observed = exact, values
        if sigma_mm:
            target = prepared.smoothed[sigma_mm]
            observed, _ = _smoothed(cbct, (sigma_mm,) * 3).sample(points)
        result = minimize(
            mean_square,
            params,
            args=(target, observed),
            method="Powell",  # unbounded: a bounded Powell line-searches the whole range
            options={"xtol": tolerance, "ftol": 1e-7, "maxfev": 600},
        )
        params = result.x
    final = mean_square(params, exact, values)
    if final >= 1e12:
        raise RegistrationError("the CBCT and the planning CT do not overlap")
    translation, rotation = rigid_parameters(matrix_of(params))
    if (
        max(map(abs, translation)) > MAX_TRANSLATION_MM
        or max(map(abs, rotation)) > MAX_ROTATION_DEG
    ):
        shift = ", ".join(f"{v:.1f}" for v in translation)
        turn = ", ".join(f"{v:.1f}" for v in rotation)
        raise RegistrationError(
            f"the CBCT does not match the planning CT: the best fit moves the patient by "
            f"({shift}) mm and ({turn})° (beyond {MAX_TRANSLATION_MM:g} mm or "
            f"{MAX_ROTATION_DEG:g}° no couch correction is plausible); is the patient imaged "
            f"the patient planned?"
        )
    sampled, inside = exact.sample(transform_points(matrix_of(params), points))
    correlation = float(np.corrcoef(sampled[inside], values[inside])[0, 1])
    if not correlation >= MIN_CORRELATION:
        raise RegistrationError(
            f"the CBCT does not match the planning CT: at the best fit their voxels correlate "
            f"{correlation:.2f} (the same patient correlates above {MIN_CORRELATION:g}); is "
            f"the patient imaged the patient planned?"
        )
    return RigidRegistration(matrix_of(params), final, evaluations, correlation)


def _overlap_length(planning: Volume, cbct: Volume) -> float:
    """How much of the patient's length (mm, along z) both scans cover."""

    def extent(volume: Volume) -> tuple[float, float]:
        start = volume.origin[2]
        return start, start + (volume.hu.shape[0] - 1) * volume.spacing[2]

    (a0, a1), (b0, b1) = extent(planning), extent(cbct)
    return max(0.0, min(a1, b1) - max(a0, b0))


def _resolution_gap(
    fine: tuple[float, float, float], coarse: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Gaussian sigma (mm, x y z) that blurs ``fine`` voxels to ``coarse`` voxels' width.

    A box of width w has the variance w**2 / 12; the blur adds what the finer box lacks.
    """
    return tuple(  # type: ignore[return-value]
        float(np.sqrt(max(c**2 - f**2, 0.0) / 12.0)) for f, c in zip(fine, coarse, strict=True)
    )


def _smoothed(volume: Volume, sigma_mm: tuple[float, float, float]) -> Volume:
    sigma = [s / spacing for s, spacing in zip(sigma_mm[::-1], volume.spacing[::-1], strict=True)]
    if not any(sigma):
        return volume
    return Volume(gaussian_filter(volume.hu, sigma, mode="nearest"), volume.origin, volume.spacing)
