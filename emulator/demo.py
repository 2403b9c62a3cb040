"""``tdw-emu demo``: the embedded reference TMS and Archive and a device through a fraction.

It starts both reference AEs on free loopback ports, seeds a synthetic patient, and runs an
emulated PDS through the session (RO-17 to RO-26) with a live bar per beam in MU, or, with
``--kind afterloader``, an HDR afterloader through a brachytherapy fraction with a live bar
per channel in seconds. With ``--interrupt BEAM:MU`` (``CHANNEL:SECONDS``) an interlock
(the door) trips there; the TMS schedules the CONTINUATION from the stored record and the
device delivers exactly the rest. It ends with the UPS outcomes and the objects the
Archive holds, and exits 0 only if everything ran as intended.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from devices.afterloader import ChannelEnded, ChannelTick
from devices.base import BeamEnded, DeliveryEvent, MetersetTick
from emulator import terminal
from emulator.config import parse_interrupt
from emulator.interrupts import EXIT_INTERRUPTED, GracefulStop
from emulator.net.peers import Peer
from emulator.performer.delivery import BeamTask
from emulator.performer.dwell_delivery import ChannelTask
from emulator.performer.runner import judge
from emulator.performer.workflow import DeviceConfig, PerformingDevice, UpsOutcome
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions

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


class ChannelBars:
    """One rich progress bar per channel, in seconds of source time, fed by the
    afterloader's events (its total: the channel's seconds with today's source)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[int, TaskID] = {}

    def beam_started(self, task: ChannelTask) -> None:
        channel = task.programme
        self.bars[channel.channel] = self.progress.add_task(
            f"channel {channel.channel} ({len(channel.dwells)} dwells)", total=channel.total_s
        )

    def event(self, task: ChannelTask, event: object) -> None:
        bar = self.bars.get(task.programme.channel)
        if bar is None:
            return
        if isinstance(event, ChannelTick):
            self.progress.update(bar, completed=event.delivered_s)
        elif isinstance(event, ChannelEnded):
            description = self.progress.tasks[bar].description
            self.progress.update(
                bar,
                completed=event.delivered_s,
                description=f"{description} [{event.termination.value}]",
            )


@dataclass(frozen=True)
class DemoKind:
    """What the demo runs for one device kind: its station, AE, bars and units."""

    kind: str
    station: str
    device_ae: str
    unit: str
    ups_per_session: int
    bars: type


KINDS = {
    "pds": DemoKind("pds", "LINAC1", "PDS1", "MU", 4, BeamBars),
    "afterloader": DemoKind("afterloader", "HDR1", "AL1", "s", 1, ChannelBars),
}


def _outcome_table(outcomes: list[UpsOutcome], demo: DemoKind) -> Table:
    table = Table(title="UPS outcomes")
    unit = "beam" if demo.unit == "MU" else "channel"
    for column in ("UPS", "state", f"delivered {demo.unit}", "stored", "reason"):
        table.add_column(column)
    for o in outcomes:
        given = ", ".join(f"{unit} {b}: {m:g}" for b, m in o.delivered.items())
        table.add_row(o.label, o.state, given, str(len(o.stored)), o.reason[:50])
    return table


def _copy_records(site: ReferenceSite, out: Path) -> list[Path]:
    """The treatment records the Archive took, as plain Part 10 files in session order
    (record_1.dcm, ...), so a user opens them without the store's index."""
    store = site.archive.store
    records = sorted(
        (store.read(i) for i in store if i.values["modality"] == "RTRECORD"),
        key=lambda ds: (str(ds.TreatmentDate), str(ds.TreatmentTime), str(ds.InstanceCreationTime)),
    )
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, record in enumerate(records, start=1):
        paths.append(out / f"record_{number}.dcm")
        record.save_as(paths[-1], enforce_file_format=True)
    return paths


def run_demo(
    data_dir: Path | None = None,
    interrupt: str | None = None,
    time_scale: float = 0.02,
    kind: str = "pds",
) -> int:
    console = terminal.console()
    demo = KINDS[kind]
    stop = GracefulStop()
    with stop.installed():
        code = _run(demo, console, stop, data_dir, interrupt, time_scale)
    if stop.requested:
        console.print(
            f"stopped by {stop.signal_name}: the UPS performed was canceled as an operator "
            "hold with its record; nothing left IN PROGRESS"
        )
        return EXIT_INTERRUPTED
    return code


def _run(
    demo: DemoKind,
    console,
    stop: GracefulStop,
    data_dir: Path | None,
    interrupt: str | None,
    time_scale: float,
) -> int:
    interlocks = parse_interrupt(interrupt)
    with tempfile.TemporaryDirectory(prefix="tdw-demo-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>6.1f} / {task.total:g} " + demo.unit),
            console=console,
        )
        bars = demo.bars(progress)
        placeholder = Peer("TMS", "127.0.0.1", PLACEHOLDER)
        device = PerformingDevice(
            DeviceConfig(
                demo.kind,
                demo.station,
                demo.device_ae,
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
                peers=[Peer(demo.device_ae, *device.receiver.address)],
                seed_options=SeedOptions(slices=16, beams=5, dynamic_beams=2),
            )
            with ReferenceSite(config) as site:
                device.point_at(
                    Peer("TMS", *site.tms.address), Peer("ARCHIVE", *site.archive.address)
                )
                console.print(
                    f"reference TMS on {site.tms.address[0]}:{site.tms.address[1]}, "
                    f"Archive on {site.archive.address[1]}, {demo.device_ae} on "
                    f"{device.receiver.address[1]}"
                )
                kind_of_patient = "afterloader" if demo.kind == "afterloader" else "linac"
                site.seed(demo.station, 1, kind=kind_of_patient)
                rounds = 2 if interlocks else 1
                stop.on_stop(device.stop_work)
                with progress:
                    for _ in range(rounds):
                        if stop.requested:
                            break
                        outcomes += device.run_once()
                held = Counter(i.values["modality"] for i in site.archive.store)
                records = _copy_records(site, root / "records") if data_dir else []
                continuations = len(site.tms.continuations)
        console.print(_outcome_table(outcomes, demo))
        stored = Table(title="objects in the reference Archive")
        stored.add_column("modality")
        stored.add_column("count")
        for modality, count in sorted(held.items()):
            stored.add_row(modality, str(count))
        console.print(stored)
        if data_dir:
            for path in records:
                console.print(f"treatment record: {path}")
        problems = judge(outcomes, bool(interlocks))
        if interlocks and continuations != 1:
            problems.append("no CONTINUATION session was scheduled after the interruption")
        if len(outcomes) != demo.ups_per_session * (2 if interlocks else 1):
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
