"""``tdw-emu demo``: the whole planning-to-device data path on loopback, in one command.

Until the reference TMS and the performing devices land, the demo does what the Archive
side of the workflow needs: a planning system stores a synthetic patient (RO-1 to RO-12),
then a device retrieves the plan and the CT series by Study Root C-MOVE (RO-18) into its
own Storage SCP, and the demo checks that every byte that arrived is what was stored.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from rich.console import Console
from rich.table import Table

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes
from emulator.reference.archive import ArchiveConfig, ArchiveServer
from emulator.seeding import SeedOptions, seed_patients
from emulator.store import ObjectStore

PLANNER_AE = "TDW_PLANNER"
DEVICE_AE = "TDW_DEVICE"
ARCHIVE_AE = "TDW_ARCHIVE"


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def run_demo(data_dir: Path | None = None) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="tdw-demo-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        uids = load_sop_classes("final")
        steps: list[tuple[str, str, str]] = []

        def step(name: str, detail: str, started: float) -> None:
            steps.append((name, detail, f"{(time.perf_counter() - started) * 1000:.0f} ms"))

        t = time.perf_counter()
        paths = seed_patients(root / "seed", SeedOptions())[0]
        step("seed", f"{len(paths)} objects written to {paths[0].parent}", t)

        receiver = StorageReceiver(
            root / "device", DEVICE_AE, uids.archive_storage_uids(), [ARCHIVE_AE]
        )
        with receiver:
            device_host, device_port = receiver.address
            archive = ArchiveServer(
                ArchiveConfig(
                    data_dir=root / "archive",
                    ae_title=ARCHIVE_AE,
                    port=0,
                    peers=[Peer(DEVICE_AE, device_host, device_port)],
                    allowed_callers=[PLANNER_AE],
                )
            )
            with archive:
                host, port = archive.address
                peer = Peer(ARCHIVE_AE, host, port)
                console.print(
                    f"archive {ARCHIVE_AE} on {host}:{port}, device {DEVICE_AE} on "
                    f"{device_host}:{device_port}"
                )
                t = time.perf_counter()
                scu.echo(PLANNER_AE, peer)
                step("C-ECHO", "planner -> archive: success", t)

                t = time.perf_counter()
                scu.store(PLANNER_AE, peer, paths)
                step("C-STORE (RO-1..12)", f"{len(paths)} objects acknowledged", t)

                t = time.perf_counter()
                studies = scu.find(
                    DEVICE_AE,
                    peer,
                    _identifier(
                        "STUDY",
                        PatientID="TDW0001",
                        StudyInstanceUID="",
                        ModalitiesInStudy="",
                        NumberOfStudyRelatedInstances="",
                    ),
                )
                study = studies[0]
                step(
                    "C-FIND study",
                    f"{len(studies)} study, modalities {'/'.join(study.ModalitiesInStudy)}, "
                    f"{study.NumberOfStudyRelatedInstances} instances",
                    t,
                )
                series = scu.find(
                    DEVICE_AE,
                    peer,
                    _identifier(
                        "SERIES",
                        StudyInstanceUID=study.StudyInstanceUID,
                        SeriesInstanceUID="",
                        Modality="",
                        NumberOfSeriesRelatedInstances="",
                    ),
                )
                by_modality = {s.Modality: s for s in series}
                plan_uid = archive.store.select("modality = 'RTPLAN'")[0].sop_instance_uid

                t = time.perf_counter()
                plan_move = scu.move(
                    DEVICE_AE,
                    peer,
                    _identifier("IMAGE", SOPInstanceUID=plan_uid),
                    DEVICE_AE,
                )
                step("C-MOVE plan (RO-18)", f"{plan_move.completed} instance moved", t)
                t = time.perf_counter()
                ct_move = scu.move(
                    DEVICE_AE,
                    peer,
                    _identifier(
                        "SERIES",
                        StudyInstanceUID=study.StudyInstanceUID,
                        SeriesInstanceUID=by_modality["CT"].SeriesInstanceUID,
                    ),
                    DEVICE_AE,
                )
                step("C-MOVE CT series (RO-18)", f"{ct_move.completed} slices moved", t)

                t = time.perf_counter()
                moved = [
                    plan_uid,
                    *(
                        i.sop_instance_uid
                        for i in archive.store.select(
                            "series_instance_uid = ?", (by_modality["CT"].SeriesInstanceUID,)
                        )
                    ),
                ]
                mismatches = same_content(archive.store, receiver.store, moved)
                step("verify", f"{len(moved) - len(mismatches)}/{len(moved)} objects identical", t)

        table = Table(title="tdw-emu demo: planning data to a device over DICOM")
        for column in ("step", "result", "time"):
            table.add_column(column)
        for row in steps:
            table.add_row(*row)
        console.print(table)
        if mismatches:
            console.print(f"[red]{len(mismatches)} retrieved objects differ: {mismatches}")
            return 1
        console.print("[green]every retrieved object matches the archived one")
        return 0


def same_content(source: ObjectStore, copy: ObjectStore, sop_instance_uids: list[str]) -> list[str]:
    """UIDs whose dataset (file meta aside) differs between two stores, or is missing."""
    differing = []
    for uid in sop_instance_uids:
        original, received = source.get(uid), copy.get(uid)
        if received is None or original is None or source.read(original) != copy.read(received):
            differing.append(uid)
    return differing
