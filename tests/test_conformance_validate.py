"""``tdw-emu validate``: Appendix A on files at rest, clean on what we write, biting on breaks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from emulator.cli import main
from emulator.conformance.rulebook import RuleBook


@pytest.fixture
def seeded(patient_files, tmp_path) -> Path:
    out = tmp_path / "patient"
    out.mkdir()
    for path in patient_files:
        shutil.copy(path, out / path.name)
    return out


def _file_of(directory: Path, modality: str) -> Path:
    for path in sorted(directory.iterdir()):
        if dcmread(path, stop_before_pixels=True).get("Modality") == modality:
            return path
    raise AssertionError(f"no {modality} in {directory}")


def _edit(path: Path, **values) -> None:
    ds = dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_the_synthetic_patient_has_no_appendix_a_finding(seeded, tmp_path, capsys):
    report = tmp_path / "findings.json"
    assert main(["validate", str(seeded), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "0 finding(s), 0 error(s), 0 unreadable" in out
    data = json.loads(report.read_text())
    assert data["objects"] == len(list(seeded.iterdir())) and data["findings"] == []


@pytest.mark.parametrize(
    ("modality", "edit", "rule", "attribute"),
    [
        (
            "RTPLAN",
            {"FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.77"},
            "Appendix-A/A.1-Frame-of-Reference",
            "FrameOfReferenceUID (0020,0052)",
        ),
        ("RTDOSE", {"PatientName": "Other^Patient"}, "Appendix-A/A.1-Patient", "PatientName"),
        ("RTDOSE", {"StudyDate": "19990101"}, "Appendix-A/A.1-Study", "StudyDate"),
        ("RTDOSE", {"BitsStored": 12}, "Appendix-A/A.3-RT-Dose", "BitsStored (0028,0101)"),
        ("RTDOSE", {"DoseUnits": "RELATIVE"}, "Appendix-A/A.3-RT-Dose", "DoseUnits"),
        (
            "RTPLAN",
            {"RTPlanGeometry": "TREATMENT_DEVICE"},
            "Appendix-A/A.3-RT-Plan",
            "RTPlanGeometry",
        ),
        (
            "RTSTRUCT",
            {"StructureSetLabel": ""},
            "Appendix-A/A.3-RT-Structure-Set",
            "StructureSetLabel",
        ),
    ],
)
def test_each_appendix_a_break_is_named(seeded, tmp_path, capsys, modality, edit, rule, attribute):
    _edit(_file_of(seeded, modality), **edit)
    report = tmp_path / "findings.json"
    assert main(["validate", str(seeded), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert rule in out
    findings = json.loads(report.read_text())["findings"]
    hits = [f for f in findings if f["rule"] == rule]
    assert hits, findings
    assert any(attribute in f["attribute"] for f in hits), hits
    book = RuleBook.load("ihe-ro-2008")
    for finding in hits:
        assert finding["severity"] == "error"
        assert finding["reason"] == book.rules[rule].statement
        assert finding["reference"].startswith("IHE-RO 2008 Appendix A")
        assert finding["where"].endswith(".dcm")


def test_a_plan_beam_constraint_names_the_item(seeded, tmp_path, capsys):
    plan_path = _file_of(seeded, "RTPLAN")
    ds = dcmread(plan_path)
    ds.BeamSequence[1].RadiationType = "ELECTRON"
    ds.BeamSequence[1].BeamName = ds.BeamSequence[0].BeamName
    ds.save_as(plan_path)
    assert main(["validate", str(plan_path)]) == 1
    out = capsys.readouterr().out
    assert "BeamSequence[1]>RadiationType is 'ELECTRON', must be 'PHOTON'" in out
    assert "BeamSequence>BeamName repeats" in out


def test_unreadable_files_fail_the_validation(tmp_path, capsys):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    assert main(["validate", str(junk)]) == 1
    assert "unreadable" in capsys.readouterr().out
