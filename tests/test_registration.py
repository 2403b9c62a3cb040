"""RO-22/RO-23 in six degrees of freedom, judged without the product's own registration code.

The simulated couch holds the patient with a setup error in every axis (3, -2, 1.5 mm and
0.8, -0.6, 1.2 degrees). The test reads the stored DICOM back, resamples the CBCT into the
planning CT's grid with the matrix the RO-23 object carries, and measures what is left with
its own landmarks: the body's centroid for x and y, the intervertebral discs for z. It also
asks the simulator (the ground truth) where the patient lies after the couch moved.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from devices.clock import Clock
from devices.couch_axes import to_table_top
from devices.registry import open_device
from emulator.profile import load_sop_classes
from emulator.results.acquisition import build_cbct_series
from emulator.results.registration import build_registration
from emulator.results.rigid_registration import (
    register_rigid,
    register_series,
    volume_from_images,
)
from emulator.synth import PatientContext
from emulator.synth.ct import build_ct_series
from emulator.synth.phantom import PhantomGeometry
from tests.conftest import dciodvfy_errors

BODY_HU = -300.0
AXES = ("x", "y", "z")


def _voxels(images: list[Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU[z, y, x], the first voxel's centre and the spacing, read the test's own way."""
    images = sorted(images, key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in images]
    )
    origin = np.array([float(v) for v in images[0].ImagePositionPatient])
    dz = float(images[1].ImagePositionPatient[2]) - origin[2]
    dy, dx = (float(v) for v in images[0].PixelSpacing)
    return hu, origin, np.array([dx, dy, dz])


def _cbct_in_planning_grid(planning, cbct, cbct_to_planning: np.ndarray):
    """The CBCT resampled onto the planning grid, and where it covered that grid."""
    plan_hu, plan_origin, plan_spacing = _voxels(planning)
    cbct_hu, cbct_origin, cbct_spacing = _voxels(cbct)
    nz, ny, nx = plan_hu.shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3) * plan_spacing + plan_origin
    inverse = np.linalg.inv(cbct_to_planning)
    in_cbct = points @ inverse[:3, :3].T + inverse[:3, 3]
    index = (in_cbct - cbct_origin) / cbct_spacing
    upper = np.array(cbct_hu.shape[::-1]) - 1
    covered = np.all((index >= 0) & (index <= upper), axis=1).reshape(plan_hu.shape)
    resampled = map_coordinates(cbct_hu, index[:, ::-1].T, order=1, cval=-1000.0)
    return plan_hu, resampled.reshape(plan_hu.shape), covered, plan_origin, plan_spacing


def _landmarks(hu: np.ndarray, slices: np.ndarray, origin, spacing, geometry):
    """Body centroid (x, y) over ``slices``, and the z of the disc centres found there."""
    body = hu[slices] > BODY_HU
    _, ys, xs = np.nonzero(body)
    centroid = origin[:2] + np.array([xs.mean(), ys.mean()]) * spacing[:2]
    # The spine column's mean HU along z: discs are its minima, found to sub-slice precision.
    column_x = round((0 - origin[0]) / spacing[0])
    column_y = round((geometry.spine_centre_y - origin[1]) / spacing[1])
    half = max(1, int(geometry.spine_radius / 2 / spacing[0]))
    profile = hu[slices][
        :, column_y - half : column_y + half + 1, column_x - half : column_x + half + 1
    ]
    profile = profile.mean(axis=(1, 2))
    z_of = origin[2] + np.flatnonzero(slices) * spacing[2]
    centres = []
    for i in range(1, len(profile) - 1):
        if profile[i] < profile[i - 1] and profile[i] <= profile[i + 1] and profile[i] < 400:
            a, b, c = profile[i - 1 : i + 2]
            offset = 0.5 * (a - c) / (a - 2 * b + c)
            centres.append(z_of[i] + offset * spacing[2])
    assert centres, "no intervertebral disc in the overlap: z cannot be measured"
    return centroid, np.array(centres)


def _residual(planning, cbct, matrix, geometry) -> np.ndarray:
    """Per axis (mm): where the resampled CBCT's landmarks lie minus the planning CT's."""
    plan_hu, resampled, covered, origin, spacing = _cbct_in_planning_grid(planning, cbct, matrix)
    slices = covered.mean(axis=(1, 2)) > 0.9  # planning slices the CBCT covers (nearly) whole
    assert slices.sum() >= 8, "the CBCT covers too little of the planning CT"
    # Both sides see the same region: what the CBCT did not cover counts as air in both.
    plan_hu = np.where(covered, plan_hu, -1000.0)
    seen_xy, seen_discs = _landmarks(resampled, slices, origin, spacing, geometry)
    plan_xy, plan_discs = _landmarks(plan_hu, slices, origin, spacing, geometry)
    # Each planning disc against the nearest disc in the CBCT (discs are a pitch apart).
    shifts = [seen_discs[np.abs(seen_discs - z).argmin()] - z for z in plan_discs]
    shifts = [d for d in shifts if abs(d) < geometry.vertebra_pitch / 2]
    assert shifts, "no disc matched between the CBCT and the planning CT"
    return np.array([*(seen_xy - plan_xy), np.mean(shifts)])


def _stored_matrix(registration: Dataset) -> np.ndarray:
    [_, cbct_item] = registration.RegistrationSequence
    matrix = cbct_item.MatrixRegistrationSequence[0].MatrixSequence[0]
    assert matrix.FrameOfReferenceTransformationMatrixType == "RIGID"
    return np.array(matrix.FrameOfReferenceTransformationMatrix, dtype=float).reshape(4, 4)


def _true_pose(device) -> tuple[np.ndarray, np.ndarray]:
    """The simulator's ground truth: translation (mm) and rotations (deg) of the patient."""
    pose = device.imager.pose
    return pose[:3, 3], Rotation.from_matrix(pose[:3, :3]).as_euler("xyz", degrees=True)


def test_six_degree_registration_is_stored_and_the_couch_corrects_every_axis(tmp_path):
    uids = load_sop_classes()
    geometry = PhantomGeometry()
    ctx = PatientContext(patient_name="TDW^Registration", patient_id="REG0001")
    planning = build_ct_series(ctx, geometry, uids)
    with open_device("sim", Clock(0)) as device:
        device.place_patient(volume_from_images(planning))
        setup_translation, setup_rotation = _true_pose(device)
        assert np.abs(setup_translation).min() >= 1.0  # a setup error on every axis
        assert np.abs(setup_rotation).min() >= 0.5
        cbct = build_cbct_series(ctx, device.acquire("CBCT"), uids, "LINAC1")
        measured = register_rigid(volume_from_images(planning), volume_from_images(cbct))
        registration = build_registration(ctx, planning, cbct, measured.matrix, uids, "LINAC1")
        stored = []
        for index, ds in enumerate([*cbct, registration]):
            stored.append(tmp_path / f"{index:03d}.dcm")
            ds.save_as(stored[-1], enforce_file_format=True)
        assert {p.name: e for p in stored if (e := dciodvfy_errors(p))} == {}
        cbct = [dcmread(p) for p in stored[:-1]]
        matrix = _stored_matrix(dcmread(stored[-1]))

        before = _residual(planning, cbct, np.eye(4), geometry)
        after = _residual(planning, cbct, matrix, geometry)
        voxel = _voxels(cbct)[2]
        for label, residual in (("before", before), ("after", after)):
            per_axis = ", ".join(f"{a} {v:+.2f}" for a, v in zip(AXES, residual, strict=True))
            print(f"registration residual per axis (mm), {label}: {per_axis}")
        # Without registration every axis is off by the setup error where the landmarks lie
        # (the body's centre for x and y, the spine for z: a rotation moves them apart) ...
        pose = device.imager.pose
        expected = [
            *(pose[:2, 3]),
            (pose @ [0.0, geometry.spine_centre_y, 0.0, 1.0])[2],
        ]
        assert before == pytest.approx(expected, abs=0.5)
        # ... with the stored matrix, within a voxel on every axis (and far better).
        assert np.all(np.abs(after) < voxel), after
        assert np.all(np.abs(after) < np.abs(before) / 2), (before, after)

        # The couch applies the whole measured correction: rotation and translation.
        translation, rotation = measured.correction
        device.move_couch(to_table_top(translation, rotation))
        left_translation, left_rotation = _true_pose(device)
        print(
            "patient after the couch move: mm",
            left_translation.round(2),
            "deg",
            left_rotation.round(2),
        )
        # AAPM TG-142's stereotactic tolerances: positioning 1 mm, couch rotation 0.5 degree.
        assert np.all(np.abs(left_translation) < 1.0), left_translation
        assert np.all(np.abs(left_rotation) < 0.5), left_rotation
        # A second CBCT after the move registers to (nearly) nothing.
        again = build_cbct_series(ctx, device.acquire("CBCT"), uids, "LINAC1")
        check = register_rigid(volume_from_images(planning), volume_from_images(again))
        second_translation, second_rotation = check.correction
        assert np.all(np.abs(second_translation) < 0.6)
        assert np.all(np.abs(second_rotation) < 0.3)


def test_a_couch_that_cannot_rotate_gets_no_rotation_and_refuses_one():
    uids = load_sop_classes()
    ctx = PatientContext(patient_name="TDW^Registration", patient_id="REG0002")
    planning = build_ct_series(ctx, PhantomGeometry(), uids)
    with open_device("sim", Clock(0)) as device:
        device.profile = {
            **device.profile,
            "axes": {**device.profile["axes"], "rotation_limits_deg": 0},
        }
        assert device.capabilities().couch_rotation_limits_deg == 0
        device.place_patient(volume_from_images(planning))
        cbct = build_cbct_series(ctx, device.acquire("CBCT"), uids, "LINAC1")
        measured = register_rigid(
            volume_from_images(planning), volume_from_images(cbct), rotations=False
        )
        assert measured.correction[1] == (0.0, 0.0, 0.0)
        with pytest.raises(Exception, match="rotation beyond"):
            device.move_couch(to_table_top((0, 0, 0), (0.5, 0, 0)))


def test_a_short_planning_ct_gets_no_tilt_it_cannot_see():
    """A soak's planning CT is 8 slices (20 mm): pitch and roll would be read from a slope
    along z that so short a slab does not show (they came out as 3-degree artefacts the
    couch refused). The PPS measures translations and the rotation about z only, and each
    patient placed on the couch lies with the profile's setup error again."""
    uids = load_sop_classes()
    geometry = PhantomGeometry(rows=64, columns=64, slices=8)
    ctx = PatientContext(patient_name="TDW^Short", patient_id="REG0003")
    planning = build_ct_series(ctx, geometry, uids)
    with open_device("sim", Clock(0)) as device:
        for _ in range(2):  # a second patient lies down with the setup error again
            device.place_patient(volume_from_images(planning))
            setup_translation, _ = _true_pose(device)
            cbct = build_cbct_series(ctx, device.acquire("CBCT"), uids, "LINAC1")
            measured = register_rigid(volume_from_images(planning), volume_from_images(cbct))
            translation, rotation = measured.correction
            assert rotation[:2] == (0.0, 0.0)
            device.move_couch(to_table_top(translation, rotation))
            left_translation, _ = _true_pose(device)
            # What a couch cannot be told about (the tilts) leaves the slab's centre in place:
            # x and y within TG-142's 1 mm; z within one slice.
            assert np.all(np.abs(left_translation[:2]) < 1.0), left_translation
            assert abs(left_translation[2]) < 2.5, left_translation
            assert np.abs(setup_translation).min() >= 1.0


def test_identical_images_under_other_names_share_one_measurement():
    """A soak's patients are one phantom under many names: the second device's
    registration of the same voxels is the first one's result, and a CBCT that differs
    in any voxel (the next acquisition's noise) is measured afresh."""
    uids = load_sop_classes()
    geometry = PhantomGeometry(rows=64, columns=64, slices=8)
    first = build_ct_series(
        PatientContext(patient_name="TDW^A", patient_id="SHARE1"), geometry, uids
    )
    other = build_ct_series(
        PatientContext(patient_name="TDW^B", patient_id="SHARE2"), geometry, uids
    )
    assert first[0].SOPInstanceUID != other[0].SOPInstanceUID
    with open_device("sim", Clock(0)) as device:
        device.place_patient(volume_from_images(first))
        cbct = volume_from_images(
            build_cbct_series(PatientContext(), device.acquire("CBCT"), uids, "X")
        )
        later = volume_from_images(
            build_cbct_series(PatientContext(), device.acquire("CBCT"), uids, "X")
        )
    measured = register_series(first, cbct)
    shared = register_series(other, cbct)
    assert shared is measured
    assert np.allclose(register_rigid(volume_from_images(other), cbct).matrix, measured.matrix)
    again = register_series(other, later)
    assert again is not measured and again.evaluations > 0
