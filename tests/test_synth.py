"""Synthetic patients: valid to dciodvfy and dcmdump, and true to the Appendix A rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from emulator.conformance.iod_table import check_iod
from emulator.profile import load_sop_classes
from emulator.synth import (
    ContinuationRange,
    PatientContext,
    PlanSpec,
    build_delivery_instruction,
    generate_patient,
)
from emulator.synth.dose import build_dose
from tests.conftest import SMALL_GEOMETRY, dciodvfy_errors, dcmtk, require_tool

REPO = Path(__file__).resolve().parent.parent


def test_every_planning_object_passes_dciodvfy(patient_files):
    checked = [p for p in patient_files if p.name != "RTBDI.dcm"]
    assert len(checked) == SMALL_GEOMETRY.slices + 3
    failures = {p.name: errors for p in checked if (errors := dciodvfy_errors(p))}
    assert failures == {}


def test_delivery_instruction_is_checked_by_its_attribute_table(patient, patient_files):
    # dicom3tools does not know this IOD; when a newer dicom3tools does, this test says so
    # and the RT Beams Delivery Instruction joins the dciodvfy test above.
    rtbdi = next(p for p in patient_files if p.name == "RTBDI.dcm")
    assert dciodvfy_errors(rtbdi) == ["Error - Information Object Not found"]
    assert check_iod(patient.delivery_instruction, "rt_beams_delivery_instruction") == []


def test_every_object_parses_with_dcmdump(patient_files):
    tool = dcmtk("dcmdump")
    for path in patient_files:
        result = subprocess.run([tool, "-q", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (path.name, result.stderr)
        assert "E:" not in result.stderr


def test_appendix_a_copy_rules_hold_across_objects(patient):
    source = patient.ct[0]
    copied = [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
    ]
    for ds in patient.all_objects():
        for keyword in copied:
            assert ds[keyword].value == source[keyword].value, (ds.Modality, keyword)
    for ds in (patient.structure_set, patient.plan, patient.dose):
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    for ds in (patient.plan, patient.dose):
        assert ds.PositionReferenceIndicator == source.PositionReferenceIndicator
    for ds in patient.all_objects():
        assert ds.Manufacturer and ds.ManufacturerModelName
        assert ds.SeriesNumber is not None and ds.SeriesDescription
        assert ds.SeriesDate and ds.SeriesTime
        assert ds.SpecificCharacterSet == "ISO_IR 100"


def test_structure_set_follows_appendix_a(patient):
    ss = patient.structure_set
    frame = ss.ReferencedFrameOfReferenceSequence
    assert len(frame) == 1 and len(frame[0].RTReferencedStudySequence) == 1
    series = frame[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert len(series) == 1
    assert {i.ReferencedSOPInstanceUID for i in series[0].ContourImageSequence} == {
        c.SOPInstanceUID for c in patient.ct
    }
    names = [roi.ROIName for roi in ss.StructureSetROISequence]
    assert names == ["EXTERNAL", "PTV", "ISOCENTER"] and len(set(names)) == 3
    observed = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ss.RTROIObservationsSequence}
    assert observed == {1: "EXTERNAL", 2: "PTV", 3: "ISOCENTER"}
    slice_z = {c.SOPInstanceUID: float(c.ImagePositionPatient[2]) for c in patient.ct}
    for roi in ss.ROIContourSequence:
        for contour in roi.ContourSequence:
            image = contour.ContourImageSequence
            assert len(image) == 1 and "ReferencedFrameNumber" not in image[0]
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert contour.NumberOfContourPoints == len(points)
            if contour.ContourGeometricType == "CLOSED_PLANAR":
                assert np.allclose(points[:, 2], slice_z[image[0].ReferencedSOPInstanceUID], 0.01)
    iso = ss.ROIContourSequence[2].ContourSequence[0]
    assert iso.ContourGeometricType == "POINT"


def test_plan_follows_appendix_a(patient):
    plan = patient.plan
    assert plan.RTPlanGeometry == "PATIENT" and plan.RTPlanLabel and plan.RTPlanDate
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == (
        patient.structure_set.SOPInstanceUID
    )
    assert len(plan.FractionGroupSequence) == 1
    assert plan.FractionGroupSequence[0].NumberOfBrachyApplicationSetups == 0
    assert plan.PatientSetupSequence[0].PatientPosition in {"HFS", "FFS", "HFP", "FFP"}
    assert plan.ApprovalStatus == "APPROVED"
    names = [b.BeamName for b in plan.BeamSequence]
    assert len(names) == len(set(names)) == 3
    kinds = [b.BeamType for b in plan.BeamSequence]
    assert kinds == ["STATIC", "STATIC", "DYNAMIC"]
    for beam in plan.BeamSequence:
        assert beam.RadiationType == "PHOTON"
        devices = {d.RTBeamLimitingDeviceType for d in beam.BeamLimitingDeviceSequence}
        assert devices == {"ASYMX", "ASYMY", "MLCX"}
        cps = beam.ControlPointSequence
        assert beam.NumberOfControlPoints == len(cps) == (2 if beam.BeamType == "STATIC" else 12)
        weights = [float(cp.CumulativeMetersetWeight) for cp in cps]
        assert weights[0] == 0 and weights == sorted(weights)
        assert weights[-1] == pytest.approx(float(beam.FinalCumulativeMetersetWeight))
        assert cps[0].GantryRotationDirection == "NONE"
        mlc = next(
            d.LeafJawPositions
            for d in cps[0].BeamLimitingDevicePositionSequence
            if d.RTBeamLimitingDeviceType == "MLCX"
        )
        pairs = len(mlc) // 2
        assert all(a <= b for a, b in zip(mlc[:pairs], mlc[pairs:], strict=True))


def test_dose_follows_appendix_a(patient):
    dose = patient.dose
    assert (dose.DoseUnits, dose.DoseType, dose.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert dose.SamplesPerPixel == 1 and dose.PhotometricInterpretation == "MONOCHROME2"
    assert dose.BitsAllocated in (16, 32) and dose.BitsStored == dose.BitsAllocated
    assert dose.HighBit == dose.BitsStored - 1 and dose.PixelRepresentation == 0
    assert float(dose.GridFrameOffsetVector[0]) == 0.0
    assert dose.FrameIncrementPointer == 0x3004000C
    assert [float(v) for v in dose.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == patient.plan.SOPInstanceUID
    gy = dose.pixel_array * float(dose.DoseGridScaling)
    prescription = float(patient.plan.DoseReferenceSequence[0].TargetPrescriptionDose)
    assert gy.max() == pytest.approx(prescription, rel=1e-3)
    assert gy.min() >= 0


def test_32_bit_dose_keeps_the_rules_and_parses_with_dcmtk(patient, tmp_path):
    dose = build_dose(patient.context, SMALL_GEOMETRY, patient.plan, load_sop_classes(), 32)
    path = tmp_path / "dose32.dcm"
    dose.save_as(path, enforce_file_format=True)
    assert (dose.BitsAllocated, dose.BitsStored, dose.HighBit) == (32, 32, 31)
    result = subprocess.run([dcmtk("dcmdump"), "-q", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "E:" not in result.stderr
    reread = dcmread(path)
    gy = reread.pixel_array * float(reread.DoseGridScaling)
    assert gy.max() == pytest.approx(60.0, rel=1e-6)


def test_continuation_instruction_carries_the_remaining_range(patient):
    ds = build_delivery_instruction(
        patient.context,
        patient.plan,
        load_sop_classes(),
        fraction_number=7,
        continuations={2: ContinuationRange(41.5, 100.0)},
        omitted_beams={1: "delivered before interruption"},
    )
    assert check_iod(ds, "rt_beams_delivery_instruction") == []
    tasks = {int(t.ReferencedBeamNumber): t for t in ds.BeamTaskSequence}
    assert set(tasks) == {2, 3}
    assert tasks[2].TreatmentDeliveryType == "CONTINUATION"
    assert (tasks[2].ContinuationStartMeterset, tasks[2].ContinuationEndMeterset) == (41.5, 100)
    assert "ContinuationStartMeterset" not in tasks[3]
    assert ds.OmittedBeamTaskSequence[0].ReferencedBeamNumber == 1
    broken = build_delivery_instruction(
        patient.context,
        patient.plan,
        load_sop_classes(),
        continuations={2: ContinuationRange(1, 2)},
    )
    del broken.BeamTaskSequence[1].ContinuationEndMeterset
    assert check_iod(broken, "rt_beams_delivery_instruction") == [
        "BeamTaskSequence[1]>ContinuationEndMeterset: missing (type 1C)"
    ]


def test_trial_uid_set_changes_only_the_delivery_instruction_class():
    trial = generate_patient(
        PatientContext(),
        SMALL_GEOMETRY,
        PlanSpec(beams=1, dynamic_beams=0),
        load_sop_classes("trial"),
    )
    assert trial.delivery_instruction.SOPClassUID == "1.2.840.10008.5.1.4.34.1"
    assert trial.plan.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.5"


def test_plan_spec_refuses_impossible_plans():
    with pytest.raises(ValueError, match="1 to 100 beams"):
        PlanSpec(beams=0)
    with pytest.raises(ValueError, match="dynamic beams"):
        PlanSpec(beams=2, dynamic_beams=3)


def test_seed_command_output_passes_dciodvfy(tmp_path):
    require_tool("/usr/bin/dciodvfy")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "seed",
            "--out",
            str(tmp_path),
            "--patients",
            "2",
            "--slices",
            "6",
            "--rows",
            "48",
            "--beams",
            "5",
            "--dynamic-beams",
            "3",
            "--control-points",
            "40",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 2 * (6 + 4)
    patients = {dcmread(f, stop_before_pixels=True).PatientID for f in files}
    assert patients == {"TDW0001", "TDW0002"}
    # It says what it wrote: each patient's study and RT Plan UID (what tms schedule needs).
    plans = [dcmread(f, stop_before_pixels=True) for f in files]
    plans = [ds for ds in plans if ds.Modality == "RTPLAN"]
    for plan in plans:
        line = (
            f"  patient {plan.PatientID} ({plan.PatientName}), study {plan.StudyInstanceUID}, "
            f"RT Plan {plan.SOPInstanceUID} ({plan.RTPlanLabel})"
        )
        assert line in result.stdout.splitlines(), result.stdout
    failures = {
        str(f.relative_to(tmp_path)): errors
        for f in files
        if f.name != "RTBDI.dcm" and (errors := dciodvfy_errors(f))
    }
    assert failures == {}
    for bdi in tmp_path.rglob("RTBDI.dcm"):
        assert check_iod(dcmread(bdi), "rt_beams_delivery_instruction") == []
