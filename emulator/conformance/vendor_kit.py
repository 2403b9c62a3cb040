"""What a TMS vendor loads before running the scenario suite: ``tdw-emu scenarios prepare``.

The reference TMS schedules the suite's sessions itself (``tdw-emu tms --seed-scenarios``);
a vendor's TMS has to be given the same work. The kit is made by the reference site's own
seeding and scheduling (so it is exactly what the reference TMS would serve) and written as:

- ``archive/<station>/``: the patient data per scenario station (CT series, RT Structure
  Set, RT Plan, RT Dose) as DICOM files, to load into the Archive;
- ``withheld/<station>/``: the RT Plan of the missing-plan scenario, which the schedule
  references but the Archive must NOT hold;
- ``tms/<station>/``: the RT Beams Delivery Instructions the delivery UPS reference at the
  TMS (RO-20), for a TMS that stores them; a TMS that makes its own references its own;
- ``schedule/<station>/``: every UPS, as the DICOM JSON model (PS3.18 F.2; the body of a
  UPS-RS CreateWorkitem) with the N-CREATE attributes of PS3.4 Table CC.2.5-3;
- ``README.md`` and ``manifest.json``: stations, AE titles, the day window and the plan
  constraints the devices check.

:func:`load_kit` puts a kit into a reference site: the test that a kit is complete.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from emulator import ups_attributes
from emulator.conformance.suite import Scenario, load_scenarios
from emulator.profile import load_yaml
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from emulator.store.importer import import_files
from emulator.ups_references import references_in

MACHINE = "machines/linac.yaml"
DAY_START = dt.time(8, 0)


@dataclass(frozen=True)
class KitRequest:
    """Whose AE titles the kit's references name, which day it is for, and its edition."""

    out: Path
    day: dt.date
    tms_ae_title: str = "TMS"
    archive_ae_title: str = "ARCHIVE"
    edition: str = "ihe-ro-2008"
    uid_set: str = "final"
    seed_options: SeedOptions = field(default_factory=SeedOptions)


def plan_constraints() -> dict:
    """What the emulated linac accepts (``profiles/machines/linac.yaml``): a plan outside
    these is refused by the device before any claim, whatever the TMS did."""
    machine = load_yaml(MACHINE)
    return {
        "energies_mv": machine["energies_mv"],
        "mlc_leaf_pairs": machine["mlc_leaf_pairs"],
        "dose_rate_mu_per_min": [machine["dose_rate"]["min"], machine["dose_rate"]["max"]],
        "max_beams": machine["max_beams"],
        "patient_positions": machine["patient_positions"],
    }


def write_kit(request: KitRequest, scenarios: list[Scenario] | None = None) -> dict:
    """Writes the kit under ``request.out``; returns its manifest."""
    scenarios = scenarios or load_scenarios(edition=request.edition)
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    for part in ("archive", "withheld", "tms", "schedule"):
        shutil.rmtree(out / part, ignore_errors=True)
    stations = []
    with tempfile.TemporaryDirectory(prefix="tdw-kit-") as tmp:
        site = ReferenceSite(
            SiteConfig(
                data_dir=Path(tmp),
                tms_ae_title=request.tms_ae_title,
                archive_ae_title=request.archive_ae_title,
                tms_port=0,
                archive_port=0,
                edition=request.edition,
                uid_set=request.uid_set,
                seed_options=request.seed_options,
            )
        )
        try:
            start = dt.datetime.combine(request.day, DAY_START)
            index = 1
            for scenario in scenarios:
                sessions = []
                for _ in range(scenario.sessions):
                    session_id = site.seed(scenario.station, index, start=start, kind=scenario.kind)
                    sessions.append(_export_session(site, scenario, session_id, index, out))
                    index += 1
                stations.append(
                    {
                        "station": scenario.station,
                        "scenario": scenario.name,
                        "sessions": sessions,
                        "plan_withheld_from_archive": scenario.inputs_missing,
                    }
                )
        finally:
            site.stop()
    manifest = {
        "edition": request.edition,
        "uids": request.uid_set,
        "day": request.day.isoformat(),
        "worklist_window": f"{request.day:%Y%m%d}000000-{request.day:%Y%m%d}235959",
        "tms_ae_title": request.tms_ae_title,
        "archive_ae_title": request.archive_ae_title,
        "plan_constraints": plan_constraints(),
        "stations": stations,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "README.md").write_text(_readme(manifest))
    return manifest


def _export_session(
    site: ReferenceSite, scenario: Scenario, session_id: str, index: int, out: Path
) -> dict:
    station = scenario.station
    session = site.tms.ups.session(session_id)
    seeded = Path(site.config.data_dir) / "seed" / f"patient_{index:03d}"
    files = []
    for path in sorted(seeded.glob("*.dcm")):
        if path.name == "RTBDI.dcm":
            continue  # the synthetic patient's own; the TMS's is exported below
        withheld = scenario.inputs_missing and path.name == "RTPLAN.dcm"
        target = out / ("withheld" if withheld else "archive") / station
        files.append(_copy(path, target / f"p{index:03d}_{path.name}", out))
    schedule_dir = out / "schedule" / station
    schedule_dir.mkdir(parents=True, exist_ok=True)
    ups_files = []
    for record in site.tms.ups.select("session_id = ?", [session_id]):
        ups = _n_create_attributes(record.dataset)
        path = schedule_dir / f"p{index:03d}_{record.step}.json"
        path.write_text(json.dumps(ups.to_json_dict(), indent=1))
        # The UID is not in the data set: an N-CREATE carries it as the Affected SOP
        # Instance UID (PS3.4 Table CC.2.5-3, SOP Instance UID "Not allowed" in the set).
        ups_files.append(
            {
                "file": str(path.relative_to(out)),
                "sop_instance_uid": record.sop_instance_uid,
                "step": record.step,
            }
        )
        for ref in references_in(ups.get("InputInformationSequence") or []):
            instance = site.tms.store.get(ref.sop_instance_uid)
            if instance is not None:  # held by the TMS, not the Archive: RO-20's inputs
                target = out / "tms" / station / f"p{index:03d}_RTBDI.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                site.tms.store.read(instance).save_as(target, enforce_file_format=True)
                files.append(str(target.relative_to(out)))
    return {
        "patient_id": session.patient_id,
        "plan_uid": session.plan_uid,
        "files": files,
        "ups": ups_files,
    }


def _copy(source: Path, target: Path, out: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return str(target.relative_to(out))


def _n_create_attributes(ups: Dataset) -> Dataset:
    """The UPS as an N-CREATE data set carries it: without what the SCP owns or the
    command carries (PS3.4 Table CC.2.5-3 "Not allowed" in N-CREATE: the SOP Class and
    Instance UIDs travel as the Affected SOP Class and Instance UID)."""
    created = Dataset()
    created.update(ups)
    for row in ups_attributes.table():
        scu = row.n_create.split("/")[0].strip().lower()
        if scu == "not allowed" and row.keyword in created:
            delattr(created, row.keyword)
        elif scu == "2" and row.keyword not in created:
            # Type 2: present, zero length when there is nothing to say.
            setattr(created, row.keyword, [] if row.is_sequence else None)
    created.TransactionUID = ""
    return created


def load_kit(site: ReferenceSite, kit: Path) -> int:
    """Puts a kit into a reference site as a vendor would into theirs: the Archive takes
    ``archive/``, the TMS store ``tms/``, and each session's UPS of ``schedule/`` are
    created as by N-CREATE (same checks), as one session. Returns how many UPS."""
    refused = {
        path: outcome
        for store, part in ((site.archive.store, "archive"), (site.tms.store, "tms"))
        for path, outcome in import_files(store, sorted((kit / part).rglob("*.dcm"))).items()
        if isinstance(outcome, Exception)
    }
    if refused:
        raise ValueError(f"kit files refused: {refused}")
    manifest = json.loads((kit / "manifest.json").read_text())
    created = 0
    for station in manifest["stations"]:
        for session in station["sessions"]:
            members = [_created_ups(site, kit, entry) for entry in session["ups"]]
            site.tms.scheduler.add_created_session(members)
            created += len(members)
    return created


def _created_ups(site: ReferenceSite, kit: Path, entry: dict) -> Dataset:
    """One ``schedule/`` entry as the TMS stores it after an N-CREATE of its data set with
    the entry's SOP Instance UID as the Affected SOP Instance UID."""
    ups = Dataset.from_json((kit / entry["file"]).read_text())
    problems = ups_attributes.n_create_problems(ups)
    if problems:
        raise ValueError(f"{entry['file']}: {problems[0].comment}")
    ups.SOPClassUID = site.tms.profile.sop_classes["ups_push"]
    ups.SOPInstanceUID = entry["sop_instance_uid"]
    ups.ProcedureStepState = "SCHEDULED"
    return ups


def _readme(manifest: dict) -> str:
    c = manifest["plan_constraints"]
    lines = [
        "# Scenario suite kit",
        "",
        f"Made by `tdw-emu scenarios prepare` for {manifest['day']} "
        f"(profile {manifest['edition']}, {manifest['uids']} UIDs).",
        "",
        "## Load it",
        f"1. Store every file under `archive/` in the Archive "
        f"({manifest['archive_ae_title']}), e.g. `/usr/bin/storescu +sd +r -aec "
        f"{manifest['archive_ae_title']} HOST PORT archive/`.",
        "2. Do NOT store `withheld/`: the missing-plan scenario needs a UPS whose RT Plan "
        "the Archive does not hold.",
        f"3. Schedule every UPS under `schedule/` on the TMS ({manifest['tms_ae_title']}): "
        "each file is the DICOM JSON of one N-CREATE data set (UPS Push, PS3.4 CC.2.5; the "
        "UPS-RS CreateWorkitem body). The SOP Instance UID is NOT in it: send the one "
        "`manifest.json` gives for that file (`sop_instance_uid`) as the N-CREATE's "
        "Affected SOP Instance UID (0000,1000), and UPS Push as its Affected SOP Class "
        "(Table CC.2.5-3 does not allow either in the data set). If your TMS makes its own "
        "UPS, copy every attribute shown, for the stations below.",
        "4. The delivery UPS reference the RT Beams Delivery Instructions under `tms/` at "
        f"{manifest['tms_ae_title']} (RO-20). Store them in your TMS, or let it reference "
        "its own.",
        "5. Make the devices known: each `--device AET@HOST:PORT` you give "
        "`tdw-emu scenarios run` must be an allowed caller of the TMS and the Archive, and "
        "a C-MOVE destination at that address on both.",
        "",
        "## The day window",
        f"Every UPS starts on {manifest['day']}; devices ask for "
        f"`{manifest['worklist_window']}`. Run the suite that day, or prepare again with "
        "`--date`.",
        "",
        "## Plan constraints (the emulated linac refuses other plans before claiming)",
        f"- photon energies {', '.join(f'{e:g}' for e in c['energies_mv'])} MV",
        f"- {c['mlc_leaf_pairs']} MLC leaf pairs",
        f"- dose rate {c['dose_rate_mu_per_min'][0]:g}-{c['dose_rate_mu_per_min'][1]:g} MU/min",
        f"- at most {c['max_beams']} beams; patient positions {', '.join(c['patient_positions'])}",
        "",
        "## Stations",
        "| station | scenario | sessions | note |",
        "|---|---|---|---|",
    ]
    for s in manifest["stations"]:
        note = "RT Plan withheld from the Archive" if s["plan_withheld_from_archive"] else ""
        lines.append(f"| {s['station']} | {s['scenario']} | {len(s['sessions'])} | {note} |")
    lines += [
        "",
        "## Running again",
        "A run uses the sessions (claims, completions, cancels). Before the next run, "
        "delete what the last one left at these stations and load the kit again (new "
        "UIDs: prepare a new kit). `tdw-emu scenarios run` checks this first and stops "
        "with exit code 2 when a station has no unused session.",
        "",
    ]
    return "\n".join(lines)
