"""``tdw-emu demo``: the embedded reference TMS and Archive, and a device's first steps.

Until the emulated devices land ([3/7]), the demo runs what the reference side and the
device's DICOM plumbing already do: the TMS schedules a synthetic patient's session, a
device queries its worklist (RO-17), retrieves every input from the AE its Retrieve AE
Title names (RO-18 from the Archive, RO-20 from the TMS) into its own Storage SCP, and
checks that what arrived is exactly what the Input Information Sequence promised.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from rich.console import Console
from rich.table import Table

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.store import ObjectStore
from emulator.ups_references import references_in

DEVICE_AE = "TDW_DEVICE"
STATION = "LINAC1"


def _worklist_query(station: str) -> Dataset:
    today = dt.date.today().strftime("%Y%m%d")
    ident = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "ProcedureStepLabel",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
    ):
        setattr(ident, keyword, "")
    for keyword in (
        "ScheduledWorkitemCodeSequence",
        "ScheduledProcessingParametersSequence",
        "InputInformationSequence",
    ):
        setattr(ident, keyword, Sequence([]))
    ident.ProcedureStepState = "SCHEDULED"
    ident.ScheduledProcedureStepStartDateTime = f"{today}000000-{today}235959"
    station_item = Dataset()
    station_item.CodeValue = station
    station_item.CodingSchemeDesignator = ""
    station_item.CodeMeaning = ""
    ident.ScheduledStationNameCodeSequence = Sequence([station_item])
    return ident


def run_demo(data_dir: Path | None = None) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="tdw-demo-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        steps: list[tuple[str, str, str]] = []

        def step(name: str, detail: str, started: float) -> None:
            steps.append((name, detail, f"{(time.perf_counter() - started) * 1000:.0f} ms"))

        uids = load_sop_classes("final")
        receiver = StorageReceiver(root / "device", DEVICE_AE, uids.archive_storage_uids(), None)
        with receiver:
            config = SiteConfig(
                data_dir=root / "site",
                tms_port=0,
                archive_port=0,
                peers=[Peer(DEVICE_AE, *receiver.address)],
            )
            with ReferenceSite(config) as site:
                tms = Peer(site.config.tms_ae_title, *site.tms.address)
                aes = {
                    site.config.tms_ae_title: tms,
                    site.config.archive_ae_title: Peer(
                        site.config.archive_ae_title, *site.archive.address
                    ),
                }
                console.print(
                    f"reference TMS {tms}, Archive {aes['ARCHIVE']}, device "
                    f"{DEVICE_AE}@{receiver.address[0]}:{receiver.address[1]}"
                )
                t = time.perf_counter()
                site.seed(STATION, 1)
                step("seed", "synthetic patient archived, one session scheduled", t)

                t = time.perf_counter()
                worklist = scu.find(
                    DEVICE_AE, tms, _worklist_query(STATION), model=uids["ups_pull"]
                )
                labels = ", ".join(str(u.ProcedureStepLabel) for u in worklist)
                step("RO-17 worklist", f"{len(worklist)} UPS: {labels}", t)

                expected: dict[str, str] = {}
                for ups in worklist:
                    for ref in references_in(ups.InputInformationSequence):
                        expected[ref.sop_instance_uid] = ref.retrieve_ae_title
                for ae_title in sorted(set(expected.values())):
                    t = time.perf_counter()
                    ident = Dataset()
                    ident.QueryRetrieveLevel = "IMAGE"
                    ident.SOPInstanceUID = [u for u, a in expected.items() if a == ae_title]
                    result = scu.move(DEVICE_AE, aes[ae_title], ident, DEVICE_AE)
                    transaction = "RO-20" if ae_title == site.config.tms_ae_title else "RO-18"
                    step(
                        f"{transaction} C-MOVE from {ae_title}",
                        f"{result.completed} instances, {result.failed} failed",
                        t,
                    )

                t = time.perf_counter()
                missing = [u for u in expected if receiver.store.get(u) is None]
                differing = same_content(
                    site.archive.store,
                    receiver.store,
                    [u for u, a in expected.items() if a == "ARCHIVE"],
                )
                differing += same_content(
                    site.tms.store, receiver.store, [u for u, a in expected.items() if a == "TMS"]
                )
                step(
                    "verify",
                    f"{len(expected) - len(set(missing + differing))}/{len(expected)}"
                    " inputs arrived as promised",
                    t,
                )

        table = Table(title="tdw-emu demo: embedded reference TMS and Archive")
        for column in ("step", "result", "time"):
            table.add_column(column)
        for row in steps:
            table.add_row(*row)
        console.print(table)
        if missing or differing or len(worklist) != 4:
            console.print(f"[red]inputs missing {missing}, differing {differing}")
            return 1
        console.print("[green]four UPS scheduled; every input retrieved from the AE it names")
        return 0


def same_content(source: ObjectStore, copy: ObjectStore, sop_instance_uids: list[str]) -> list[str]:
    """UIDs whose dataset (file meta aside) differs between two stores, or is missing."""
    differing = []
    for uid in sop_instance_uids:
        original, received = source.get(uid), copy.get(uid)
        if received is None or original is None or source.read(original) != copy.read(received):
            differing.append(uid)
    return differing
