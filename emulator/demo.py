"""``tdw-emu demo``: the embedded reference TMS and Archive and a PDS through a fraction.

It starts both reference AEs on free loopback ports, seeds a synthetic patient, and runs an
emulated PDS through the session (RO-17 to RO-26) with a live bar per beam in MU. With
``--interrupt BEAM:MU`` an interlock trips there; the TMS schedules the CONTINUATION from
the stored record and the PDS delivers exactly the rest. It ends with the UPS outcomes and
the objects the Archive holds, and exits 0 only if everything ran as intended.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from devices.base import BeamEnded, DeliveryEvent, MetersetTick
from emulator import terminal
from emulator.config import parse_interrupt
from emulator.net.peers import Peer
from emulator.performer.delivery import BeamTask
from emulator.performer.runner import judge
from emulator.performer.workflow import DeviceConfig, PerformingDevice, UpsOutcome
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions

STATION = "LINAC1"
DEVICE_AE = "PDS1"
PLACEHOLDER = 104  # replaced by point_at() once the reference AEs have their ports


class BeamBars:
    """One rich progress bar per beam, in MU, fed by the device's delivery events."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[int, TaskID] = {}

    def beam_started(self, task: BeamTask) -> None:
        program = task.program
        kind = "continuation of " if task.delivery_type == "CONTINUATION" else ""
        self.bars[program.beam_number] = self.progress.add_task(
            f"{kind}beam {program.beam_number} {program.name}",
            total=program.total_meterset,
            completed=program.start_meterset,
        )

    def event(self, task: BeamTask, event: DeliveryEvent) -> None:
        bar = self.bars.get(task.program.beam_number)
        if bar is None:
            return
        if isinstance(event, MetersetTick):
            self.progress.update(bar, completed=event.meterset)
        elif isinstance(event, BeamEnded):
            description = self.progress.tasks[bar].description
            self.progress.update(
                bar,
                completed=event.meterset,
                description=f"{description} [{event.termination.value}]",
            )


def _outcome_table(outcomes: list[UpsOutcome]) -> Table:
    table = Table(title="UPS outcomes")
    for column in ("UPS", "state", "delivered MU", "stored", "reason"):
        table.add_column(column)
    for o in outcomes:
        mu = ", ".join(f"beam {b}: {m:g}" for b, m in o.delivered.items())
        table.add_row(o.label, o.state, mu, str(len(o.stored)), o.reason[:50])
    return table


def run_demo(
    data_dir: Path | None = None, interrupt: str | None = None, time_scale: float = 0.02
) -> int:
    console = terminal.console()
    interlocks = parse_interrupt(interrupt)
    with tempfile.TemporaryDirectory(prefix="tdw-demo-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>6.1f} / {task.total:g} MU"),
            console=console,
        )
        bars = BeamBars(progress)
        placeholder = Peer("TMS", "127.0.0.1", PLACEHOLDER)
        device = PerformingDevice(
            DeviceConfig(
                "pds",
                STATION,
                DEVICE_AE,
                placeholder,
                Peer("ARCHIVE", "127.0.0.1", PLACEHOLDER),
                root / "device",
                time_scale=time_scale,
                interlocks=interlocks,
            ),
            on_event=bars.event,
            on_beam_start=bars.beam_started,
        )
        outcomes: list[UpsOutcome] = []
        with device:
            config = SiteConfig(
                data_dir=root / "site",
                tms_port=0,
                archive_port=0,
                peers=[Peer(DEVICE_AE, *device.receiver.address)],
                seed_options=SeedOptions(slices=16, beams=5, dynamic_beams=2),
            )
            with ReferenceSite(config) as site:
                device.point_at(
                    Peer("TMS", *site.tms.address), Peer("ARCHIVE", *site.archive.address)
                )
                console.print(
                    f"reference TMS on {site.tms.address[0]}:{site.tms.address[1]}, "
                    f"Archive on {site.archive.address[1]}, {DEVICE_AE} on "
                    f"{device.receiver.address[1]}"
                )
                site.seed(STATION, 1)
                rounds = 2 if interlocks else 1
                with progress:
                    for _ in range(rounds):
                        outcomes += device.run_once()
                held = Counter(i.values["modality"] for i in site.archive.store)
                continuations = len(site.tms.continuations)
        console.print(_outcome_table(outcomes))
        stored = Table(title="objects in the reference Archive")
        stored.add_column("modality")
        stored.add_column("count")
        for modality, count in sorted(held.items()):
            stored.add_row(modality, str(count))
        console.print(stored)
        problems = judge(outcomes, bool(interlocks))
        if interlocks and continuations != 1:
            problems.append("no CONTINUATION session was scheduled after the interruption")
        if len(outcomes) != 4 * (2 if interlocks else 1):
            problems.append(f"{len(outcomes)} UPS performed")
        for problem in problems:
            console.print(f"[red]problem: {problem}")
        if problems:
            return 1
        console.print(
            "[green]every UPS ran as intended"
            + (", and the CONTINUATION delivered the rest" if interlocks else "")
        )
        return 0
