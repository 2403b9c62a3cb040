"""CT Image series of the phantom: the Appendix A *source* of patient, study and frame."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from emulator.profile import SopClasses
from emulator.synth.common import (
    PatientContext,
    apply_equipment,
    apply_series,
    da,
    new_dataset,
    new_uid,
    tm,
)
from emulator.synth.phantom import PhantomGeometry

RESCALE_INTERCEPT = -1024


def build_ct_series(
    ctx: PatientContext, geometry: PhantomGeometry, uids: SopClasses, series_number: int = 1
) -> list[Dataset]:
    """One CT Image per slice, stored as unsigned 16-bit with a -1024 rescale intercept."""
    series_uid = new_uid()
    images = []
    for index in range(geometry.slices):
        ds = new_dataset(uids["ct_image"])
        ctx.apply_patient_study(ds)
        apply_series(ds, ctx, "CT", series_uid, series_number, "Synthetic planning CT")
        ds.PatientPosition = "HFS"
        ctx.apply_frame_of_reference(ds)
        apply_equipment(ds, model="tdw-emulator phantom CT")
        # General Image and General Acquisition
        ds.InstanceNumber = index + 1
        ds.PatientOrientation = ""
        ds.ContentDate = da(ctx.created)
        ds.ContentTime = tm(ctx.created)
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # The chest phantom is an unpaired body part, so Series Laterality is not required.
        ds.BodyPartExamined = "CHEST"
        ds.ImageLaterality = "U"
        # Image Plane
        z = geometry.slice_z(index)
        ds.PixelSpacing = [geometry.pixel_spacing, geometry.pixel_spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [geometry.origin_x, geometry.origin_y, z]
        ds.SliceThickness = geometry.slice_spacing
        ds.SliceLocation = z
        # CT Image
        ds.KVP = 120
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = geometry.rows
        ds.Columns = geometry.columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        stored = np.clip(geometry.hounsfield_slice(index) - RESCALE_INTERCEPT, 0, 65535)
        ds.PixelData = stored.astype("<u2").tobytes()
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        images.append(ds)
    return images
