"""RT Dose grid for the plan, following the Appendix A RT Dose rules.

GY, PHYSICAL, PLAN summation, 32-bit unsigned pixels with Bits Stored = Bits Allocated,
axial orientation, and a Grid Frame Offset Vector whose first value is zero.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from emulator.profile import SopClasses
from emulator.synth.common import (
    PatientContext,
    apply_equipment,
    apply_series,
    da,
    new_dataset,
    new_uid,
    sequence,
    sop_reference,
    tm,
)
from emulator.synth.phantom import PhantomGeometry

DOSE_GRID_SPACING = 4.0
DOSE_MARGIN = 40.0
PENUMBRA = 6.0


def dose_distribution(geometry: PhantomGeometry, prescription_gy: float):
    """Dose on a grid around the PTV: flat at the prescription inside, falling off outside.

    Returns the dose array (frames, rows, columns) in Gy and the grid's corner position.
    """
    iso = np.array(geometry.isocenter)
    half = geometry.ptv_radius + DOSE_MARGIN
    n = int(np.ceil(2 * half / DOSE_GRID_SPACING)) + 1
    axis = -half + DOSE_GRID_SPACING * np.arange(n)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    distance = np.sqrt(x**2 + y**2 + z**2)
    outside = np.clip(distance - geometry.ptv_radius, 0, None)
    dose = prescription_gy * np.exp(-((outside / (2 * PENUMBRA)) ** 2))
    corner = iso - half
    return dose, corner, axis - axis[0]


def build_dose(
    ctx: PatientContext,
    geometry: PhantomGeometry,
    plan: Dataset,
    uids: SopClasses,
    bits: int = 16,
) -> Dataset:
    """The plan dose; ``bits`` is 16 or 32 (Appendix A allows both).

    16 is the default because Debian's dciodvfy (dicom3tools 1.00~20220618) aborts on an
    assertion when it reads 32-bit Pixel Data, so a 32-bit dose cannot be validated by it.
    """
    if bits not in (16, 32):
        raise ValueError("RT Dose Bits Allocated must be 16 or 32 (Appendix A)")
    prescription = float(plan.DoseReferenceSequence[0].TargetPrescriptionDose)
    dose, corner, offsets = dose_distribution(geometry, prescription)
    frames, rows, columns = dose.shape
    top = (1 << bits) - 1
    scaling = float(dose.max()) / top if dose.max() > 0 else 1.0
    pixels = np.clip(np.rint(dose / scaling), 0, top).astype("<u2" if bits == 16 else "<u4")

    ds = new_dataset(uids["rt_dose"])
    ctx.apply_patient_study(ds)
    apply_series(ds, ctx, "RTDOSE", new_uid(), 4, "Synthetic plan dose")
    ctx.apply_frame_of_reference(ds)
    apply_equipment(ds)
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate = da(ctx.created)
    ds.ContentTime = tm(ctx.created)
    # Image Plane (axial only, Appendix A)
    ds.PixelSpacing = [DOSE_GRID_SPACING, DOSE_GRID_SPACING]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [round(float(c), 3) for c in corner]
    ds.SliceThickness = None
    # Image Pixel and Multi-frame
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.PixelData = pixels.tobytes()
    # RT Dose
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = plan.RTPlanLabel
    ds.DoseSummationType = "PLAN"
    # Appendix A (2008 draft) asks for a Referenced Fraction Group Sequence here, but the
    # final PS3.3 C.8.8.3 forbids it when Dose Summation Type is PLAN. The standard wins;
    # the plan has exactly one fraction group, so the reference stays unambiguous.
    ref_plan = sop_reference(plan)
    ds.ReferencedRTPlanSequence = sequence(ref_plan)
    ds.GridFrameOffsetVector = [round(float(o), 3) for o in offsets]
    ds.DoseGridScaling = f"{scaling:.9e}"
    ds.TissueHeterogeneityCorrection = "IMAGE"
    return ds
