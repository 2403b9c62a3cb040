"""`tdw-emu scenarios prepare`: the kit a TMS vendor loads before running the suite.

It must be complete (a TMS given only the kit passes the suite: docs/conformance.md runs
that, and tests/test_docs_commands.py runs docs/conformance.md), valid DICOM, named with
the vendor's AE titles, and it must say what the devices check (plan constraints) and
for which day the work is scheduled.
"""

from __future__ import annotations

import datetime as dt
import json

from pydicom import dcmread
from pydicom.dataset import Dataset

from emulator.cli import main
from emulator.conformance.suite import load_scenarios
from emulator.ups_references import references_in
from tests.conftest import dciodvfy_errors


def test_a_prepared_kit_is_valid(tmp_path, capsys):
    kit = tmp_path / "kit"
    args = ["scenarios", "prepare", "--out", str(kit), "--seed-size", "small"]
    assert main([*args, "--tms-ae", "VENDORTMS", "--archive-ae", "VENDORPACS"]) == 0
    capsys.readouterr()

    manifest = json.loads((kit / "manifest.json").read_text())
    suite = [s.name for s in load_scenarios(edition="ihe-ro-2008")]
    assert [s["scenario"] for s in manifest["stations"]] == suite
    assert manifest["plan_constraints"]["energies_mv"] == [6.0, 10.0, 15.0]
    assert manifest["plan_constraints"]["mlc_leaf_pairs"] == 60
    today = dt.date.today().strftime("%Y%m%d")
    assert manifest["worklist_window"] == f"{today}000000-{today}235959"
    readme = (kit / "README.md").read_text()
    assert "60 MLC leaf pairs" in readme and "Do NOT store `withheld/`" in readme

    # Every UPS: the N-CREATE data set, today's date, the vendor's AE titles; its UID is in
    # the manifest, for the command's Affected SOP Instance UID (PS3.4 Table CC.2.5-3).
    entries = {
        entry["file"]: entry
        for station in manifest["stations"]
        for session in station["sessions"]
        for entry in session["ups"]
    }
    assert len(entries) == len(list((kit / "schedule").rglob("*.json")))
    for path in (kit / "schedule").rglob("*.json"):
        ups = Dataset.from_json(path.read_text())
        assert ups.ProcedureStepState == "SCHEDULED" and ups.TransactionUID == ""
        assert "SOPClassUID" not in ups and "SOPInstanceUID" not in ups
        assert entries[str(path.relative_to(kit))]["sop_instance_uid"].startswith("1.")
        assert str(ups.ScheduledProcedureStepStartDateTime).startswith(today)
        for ref in references_in(ups.get("InputInformationSequence") or []):
            assert ref.retrieve_ae_title in ("VENDORTMS", "VENDORPACS"), path

    # The missing-plan case: its delivery references the withheld plan, not an archived one.
    [withheld] = (kit / "withheld").rglob("*.dcm")
    plan_uid = str(dcmread(withheld, stop_before_pixels=True).SOPInstanceUID)
    missing = next(s for s in manifest["stations"] if s["plan_withheld_from_archive"])
    assert missing["sessions"][0]["plan_uid"] == plan_uid
    archived = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (kit / "archive").rglob("*.dcm")
    }
    assert plan_uid not in archived

    # Valid DICOM: every planning object of one station, and the first CT slice of each.
    sample = [p for p in (kit / "archive" / "TDWSC-NORMAL").glob("*.dcm")]
    sample += [sorted(d.glob("*CT_0001.dcm"))[0] for d in (kit / "archive").iterdir()]
    failures = {p.name: e for p in sample if (e := dciodvfy_errors(p))}
    assert not failures, failures

    # Enough: a TMS loaded with the kit alone, under the vendor's titles, passes the whole
    # suite. docs/conformance.md does exactly that, and tests/test_docs_commands.py runs it
    # as written (exit 0 only if every scenario passed).
