"""What the kill -9 tests share: a reference site with one PDS peer, the `tdw-emu run`
command the tests kill and restart, and the results each UPS names as its output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from emulator.performer.outbox import ClaimJournal
from emulator.reference.ups_store import UpsRecord
from emulator.ups_references import references_in
from tests.conftest import REPO, ArchiveProcess, start_cli_process


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


# Journal states in which a restarted device completes or settles the claim itself; in any
# other open state it cancels it ("the device restarted while ..."). A claim journaled as
# "claiming" was on its way when the kill came: canceled if the TMS got it, else forgotten.
DECIDED = ("final_pending", "results_stored", "final_update_sent")
RESTARTED = "the device restarted while"


def undecided_claims(device_dir: Path) -> tuple[set[str], set[str]]:
    """The UPS a killed device held with no decision on how they end: (certainly claimed,
    maybe claimed). The next run must cancel every one of the first and none but these."""
    path = device_dir / "outbox.sqlite3"
    if not path.exists():
        return set(), set()
    journal = ClaimJournal(path)
    try:
        open_ = [c for c in journal.open_claims() if not c.target and c.state not in DECIDED]
    finally:
        journal.close()
    return (
        {c.ups_uid for c in open_ if c.state != "claiming"},
        {c.ups_uid for c in open_ if c.state == "claiming"},
    )


def run_to_the_end(run: list[str], device_dir: Path) -> set[str]:
    """The last, unkilled run: ``--sessions all`` takes whatever the worklist still holds
    for the device, and must exit as its report says.

    Exit 0 unless it had to cancel claims a killed run left undecided; then exit 1, with one
    ``problem:`` line per such claim and no other problem. Returns the claims it may cancel.
    """
    certain, maybe = undecided_claims(device_dir)
    final = subprocess.run(
        [*run, "--sessions", "all"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in final.stderr, final.stderr[-3000:]
    problems = [line for line in final.stderr.splitlines() if line.startswith("problem: ")]
    assert all(RESTARTED in line for line in problems), problems
    assert len(certain) <= len(problems) <= len(certain | maybe), (problems, certain, maybe)
    assert final.returncode == (1 if problems else 0), final.stdout[-3000:] + final.stderr
    return certain | maybe
