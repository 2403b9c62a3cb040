"""What the kill -9 tests share: a reference site with one PDS peer, the `tdw-emu run`
command the tests kill and restart, and the results each UPS names as its output."""

from __future__ import annotations

import sys
from pathlib import Path

from emulator.reference.ups_store import UpsRecord
from emulator.ups_references import references_in
from tests.conftest import ArchiveProcess, start_cli_process


def start_site(
    data_dir: Path,
    device_port: int,
    patients: int,
    *extra: str,
    ports: tuple[int, int] = (0, 0),
) -> ArchiveProcess:
    """`tdw-emu tms` with its Archive, PDS1 as the C-MOVE peer, one session per patient.

    Fixed ``ports`` (TMS, Archive) let a test restart the same site where a device expects
    it; ``patients=0`` restarts without seeding more.
    """
    return start_cli_process(
        "tms",
        "--data-dir", str(data_dir),
        "--port", str(ports[0]),
        "--archive-port", str(ports[1]),
        "--peer", f"PDS1@127.0.0.1:{device_port}",
        *(["--seed", "LINAC1"] * patients),
        *extra,
        ready="ready",
    )  # fmt: skip


def run_command(site: ArchiveProcess, device_port: int, data_dir: Path, *extra: str) -> list[str]:
    """The same `tdw-emu run` every time, so a restart resumes from ``data_dir``."""
    tms_host, tms_port = site.addresses["TMS"]
    archive_host, archive_port = site.addresses["ARCHIVE"]
    return [
        sys.executable, "-m", "emulator.cli", "run",
        "--kind", "pds", "--station", "LINAC1", "--ae-title", "PDS1",
        "--tms", f"TMS@{tms_host}:{tms_port}",
        "--archive", f"ARCHIVE@{archive_host}:{archive_port}",
        "--listen-port", str(device_port), "--data-dir", str(data_dir),
        *extra,
    ]  # fmt: skip


def named_results(workitems: list[UpsRecord]) -> list[str]:
    """Every SOP Instance UID a UPS names in its Output Information, repeats kept."""
    named: list[str] = []
    for workitem in workitems:
        performed = workitem.dataset.get("UnifiedProcedureStepPerformedProcedureSequence")
        outputs = performed[0].get("OutputInformationSequence", []) if performed else []
        named += [ref.sop_instance_uid for ref in references_in(outputs)]
    return named


def cancel_reason(workitem: UpsRecord) -> str:
    """The Reason For Cancellation a UPS ended with (in its progress item, PS3.3 C.30.1)."""
    items = workitem.dataset.get("ProcedureStepProgressInformationSequence") or []
    return str(items[0].get("ReasonForCancellation", "")) if items else ""
