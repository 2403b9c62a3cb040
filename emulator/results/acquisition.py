"""Position acquisition results (RO-22): a CBCT stored as CT Image objects.

The CBCT has its own frame of reference (the treatment room at acquisition time); the
registration (RO-23) relates it to the planning CT's frame.
"""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset

from devices.base import ImageSet
from emulator.profile import SopClasses
from emulator.synth import PatientContext
from emulator.synth.common import apply_equipment, apply_series, da, new_dataset, new_uid, tm


def build_cbct_series(
    ctx: PatientContext,
    images: ImageSet,
    uids: SopClasses,
    station: str,
    frame_of_reference_uid: str | None = None,
    moment: dt.datetime | None = None,
) -> list[Dataset]:
    moment = moment or dt.datetime.now().replace(microsecond=0)
    series_uid = new_uid()
    frame = frame_of_reference_uid or new_uid()
    out = []
    for index, pixels in enumerate(images.pixels):
        ds = new_dataset(uids["ct_image"])
        ctx.apply_patient_study(ds)
        apply_series(ds, ctx, "CT", series_uid, 30, f"{images.kind} position acquisition")
        ds.SeriesDate, ds.SeriesTime = da(moment), tm(moment)
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        apply_equipment(ds, model="tdw-emulator simulated kV imager", station=station[:16])
        ds.InstanceNumber = index + 1
        ds.PatientOrientation = ""
        ds.ContentDate, ds.ContentTime = da(moment), tm(moment)
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.ImageLaterality = "U"
        z = round(images.origin[2] + index * images.slice_spacing, 3)
        ds.PixelSpacing = [images.pixel_spacing, images.pixel_spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(images.origin[0], 3), round(images.origin[1], 3), z]
        ds.SliceThickness = images.slice_spacing
        ds.SliceLocation = z
        ds.KVP = 100
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        out.append(ds)
    return out
