"""Runs many emulated devices at once for a set time, then drains and judges the run.

Every device has its own thread, receiver and simulated machine, and all share one metrics
registry, so a scrape (or the live summary) sees the whole fleet. With ``embedded`` the
reference TMS and Archive run in the same process and a feeder keeps each station
supplied; against an external TMS the devices take whatever it schedules for their
stations. When the time is up feeding stops, the devices finish what is on their worklists
(continuations included) for at most ``drain_s``, and the verdict is drawn.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from emulator.metrics import Metrics
from emulator.net import scu
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.scu import DimseError
from emulator.performer.delivery import BeamTask
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from emulator.soak.feeder import SessionFeeder
from emulator.soak.fleet import FleetMember, plan_fleet
from emulator.soak.verdict import MemoryWatch, Tally, Verdict, audit_records, judge

PLACEHOLDER = Peer("TMS", "127.0.0.1", 104)


@dataclass
class SoakConfig:
    devices: int
    duration_s: float
    mix: dict[str, float] = field(default_factory=lambda: {"pds": 1.0})
    fault_rate: float = 0.0
    tms: Peer | None = None  # None: the embedded reference TMS and Archive
    archive: Peer | None = None
    data_dir: Path | None = None
    time_scale: float = 0.02
    listen_host: str = "127.0.0.1"
    listen_port_base: int = 0  # 0: free ports; else device i listens on base + i
    station_prefix: str = "SOAK"
    edition: str = "ihe-ro-2008"
    uid_set: str = "final"
    device: str = "sim"
    drain_s: float = 60.0
    poll_s: float = 0.2
    warmup_s: float | None = None
    seed: int = 1
    # Small images: a soak exercises the workflow and the TMS, not pixel throughput, and
    # every device shares one interpreter with the others.
    seed_options: SeedOptions = field(
        default_factory=lambda: SeedOptions(slices=8, rows=64, beams=4, dynamic_beams=2)
    )
    reactor_poll_s: float | None = 0.005
    network: NetworkSettings = field(default_factory=NetworkSettings)  # e.g. TLS

    def device_port(self, index: int) -> int:
        """Where fleet member ``index`` (from 1) receives; 0 picks a free port."""
        return self.listen_port_base + index if self.listen_port_base else 0

    @property
    def embedded(self) -> bool:
        return self.tms is None

    def validate(self) -> None:
        if self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("--fault-rate is a probability per beam, 0 to 1")
        if (self.tms is None) != (self.archive is None):
            raise ValueError("give both --tms and --archive, or --embedded")
        if self.fault_rate and self.device.split(":")[0] != "sim":
            raise ValueError("--fault-rate arms simulated interlocks; use the sim device")


@dataclass
class Progress:
    """What the live summary shows, once a second."""

    elapsed_s: float
    phase: str
    busy: int
    devices: int
    tally: dict
    latency: dict
    backlog: float
    rss_mib: float


class SoakRun:
    def __init__(self, config: SoakConfig, metrics: Metrics | None = None) -> None:
        config.validate()
        self.config = config
        self.metrics = metrics or Metrics()
        self.fleet: list[FleetMember] = plan_fleet(
            config.devices, config.mix, config.station_prefix
        )
        self.tally = Tally()
        self.devices: dict[str, PerformingDevice] = {}
        self.site: ReferenceSite | None = None
        self.feeder: SessionFeeder | None = None
        self.draining = threading.Event()
        self.halt = threading.Event()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self.network = dataclasses.replace(
            config.network,
            observers=(*config.network.observers, *self.metrics.observers),
            reactor_poll_s=config.reactor_poll_s,
        )

    # -- set-up ------------------------------------------------------------------------------

    def _fault_injector(self, member: FleetMember, rng: random.Random):
        """At each beam's start, with ``fault_rate``, arms the simulated dosimetry interlock
        somewhere inside that beam. One draw per beam keeps a seeded run reproducible: the
        idle polls between sessions draw nothing."""

        def on_beam_start(task: BeamTask) -> None:
            if rng.random() >= self.config.fault_rate:
                return
            device = self.devices[member.ae_title].device
            program = task.program
            span = program.stop_meterset - program.start_meterset
            at = program.start_meterset + span * rng.uniform(0.1, 0.9)
            device.arm_interlock(program.beam_number, round(at, 2))

        return on_beam_start

    def _build_devices(self, root: Path) -> None:
        cfg = self.config
        for index, member in enumerate(self.fleet, start=1):
            port = cfg.device_port(index)
            rng = random.Random(cfg.seed * 1000 + index)
            self.devices[member.ae_title] = PerformingDevice(
                DeviceConfig(
                    member.kind,
                    member.station,
                    member.ae_title,
                    cfg.tms or PLACEHOLDER,
                    cfg.archive or dataclasses.replace(PLACEHOLDER, ae_title="ARCHIVE"),
                    root / "devices" / member.ae_title,
                    listen_host=cfg.listen_host,
                    listen_port=port,
                    edition=cfg.edition,
                    uid_set=cfg.uid_set,
                    time_scale=cfg.time_scale,
                    device=cfg.device,
                    network=self.network,
                ),
                on_beam_start=self._fault_injector(member, rng) if cfg.fault_rate else None,
                metrics=self.metrics,
            )

    def _start_site(self, root: Path) -> None:
        cfg = self.config
        peers = [Peer(ae, *device.receiver.address) for ae, device in self.devices.items()]
        self.site = ReferenceSite(
            SiteConfig(
                data_dir=root / "site",
                tms_port=0,
                archive_port=0,
                peers=peers,
                edition=cfg.edition,
                uid_set=cfg.uid_set,
                seed_options=cfg.seed_options,
                network=self.network,
            ),
            self.metrics,
        )
        self.site.start()
        tms = Peer("TMS", *self.site.tms.address)
        archive = Peer("ARCHIVE", *self.site.archive.address)
        for device in self.devices.values():
            device.point_at(tms, archive)
        self.feeder = SessionFeeder(self.site, sorted({m.station for m in self.fleet}))

    # -- the device loops --------------------------------------------------------------------

    def _loop(self, member: FleetMember, device: PerformingDevice) -> None:
        while not self.halt.is_set():
            if self.feeder is not None:
                try:
                    self.feeder.ensure(member.station)
                except Exception as exc:  # a scheduling failure is the site's, but counted
                    self.tally.error(f"feeder {member.station}: {type(exc).__name__}: {exc}")
            with self._busy_lock:
                self._busy.add(member.ae_title)
            try:
                outcomes = device.run_once()
            except Exception as exc:  # a TMS that drops or refuses the worklist query
                self.tally.error(f"{member.ae_title}: {type(exc).__name__}: {exc}")
                outcomes = []
            finally:
                with self._busy_lock:
                    self._busy.discard(member.ae_title)
            if outcomes:
                self.tally.add(member.ae_title, outcomes)
                continue
            if self.draining.is_set():
                return
            self.halt.wait(self.config.poll_s)

    # -- the run -----------------------------------------------------------------------------

    def progress(self, started: float, phase: str, memory: MemoryWatch) -> Progress:
        latency = self.metrics.latencies.percentiles().get("all", {})
        backlog = sum(device.metrics.pending for device in self.devices.values())
        with self._busy_lock:
            busy = len(self._busy)
        return Progress(
            round(time.monotonic() - started, 1),
            phase,
            busy,
            len(self.devices),
            self.tally.snapshot(),
            latency,
            backlog,
            round(memory.sample() / 1024 / 1024, 1),
        )

    def run(self, on_progress: Callable[[Progress], None] | None = None) -> Verdict:
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="tdw-soak-") as tmp:
            root = Path(cfg.data_dir) if cfg.data_dir else Path(tmp)
            self._build_devices(root)
            for device in self.devices.values():
                device.start()
            try:
                if cfg.embedded:
                    self._start_site(root)
                return self._drive(on_progress)
            finally:
                self.halt.set()
                for device in self.devices.values():
                    device.stop()
                if self.site is not None:
                    self.site.stop()

    def _drive(self, on_progress: Callable[[Progress], None] | None) -> Verdict:
        cfg = self.config
        warmup = cfg.warmup_s if cfg.warmup_s is not None else min(30.0, cfg.duration_s / 5)
        memory = MemoryWatch(warmup)
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=self._loop,
                args=(member, self.devices[member.ae_title]),
                name=f"soak-{member.ae_title}",
                daemon=True,
            )
            for member in self.fleet
        ]
        for thread in threads:
            thread.start()
        deadline = started + cfg.duration_s
        warm = False
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
            if not warm and time.monotonic() - started >= warmup:
                # Latency and memory are judged in steady state, after the patients are
                # seeded and every device has started its first session.
                self.metrics.latencies.reset()
                warm = True
            if on_progress:
                on_progress(self.progress(started, "running", memory))
        ran_s = time.monotonic() - started
        if self.feeder is not None:
            self.feeder.stop()
        self.draining.set()
        drain_deadline = time.monotonic() + cfg.drain_s
        while any(t.is_alive() for t in threads) and time.monotonic() < drain_deadline:
            time.sleep(0.5)
            if on_progress:
                on_progress(self.progress(started, "draining", memory))
        drained_s = time.monotonic() - started - ran_s
        self.halt.set()
        stuck = [t.name for t in threads if t.is_alive()]
        for thread in threads:
            thread.join(timeout=30)
        return self._verdict(ran_s, drained_s, memory, stuck)

    # -- the verdict -------------------------------------------------------------------------

    def _archived(self, uid: str, ae_title: str) -> Dataset | None:
        """The Archive's copy of a record, or the device's copy once the Archive confirms it."""
        if self.site is not None:
            instance = self.site.archive.store.get(uid)
            return self.site.archive.store.read(instance) if instance else None
        device = self.devices[ae_title]
        local = device.receiver.store.get(uid)
        if local is None:
            return None
        record = device.receiver.store.read(local)
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = record.StudyInstanceUID
        query.SeriesInstanceUID = record.SeriesInstanceUID
        query.SOPInstanceUID = uid
        try:
            found = scu.find(ae_title, self.config.archive, query, settings=self.network)
        except DimseError:
            return None
        return record if found else None

    def _verdict(
        self, ran_s: float, drained_s: float, memory: MemoryWatch, stuck: list[str]
    ) -> Verdict:
        tally = self.tally
        deliveries = list(tally.deliveries)
        by_uid = {uid: d.ae_title for d in deliveries for uid in d.records}
        records = audit_records(deliveries, lambda uid: self._archived(uid, by_uid[uid]))
        tms = self.site.tms.ups.count_by_state() if self.site is not None else {}
        interrupted = tally.sessions.get("interrupted", 0)
        continued = sum(
            d.delivery_type == "CONTINUATION" and d.state in ("COMPLETED", "CANCELED")
            for d in deliveries
        )
        problems = judge(tally, records, tms, max(interrupted - continued, 0))
        if stuck:
            problems.append(f"still busy after the drain: {', '.join(stuck)}")
        completed = tally.sessions.get("completed", 0)
        delivery_states = Counter(d.state.lower() for d in deliveries)
        delivery_states["continuation"] = sum(d.delivery_type == "CONTINUATION" for d in deliveries)
        return Verdict(
            devices=len(self.devices),
            mix=dict(Counter(m.kind for m in self.fleet)),
            duration_s=round(ran_s, 1),
            drain_s=round(drained_s, 1),
            sessions={"started": 0, **dict(tally.sessions)},
            sessions_per_minute=round(completed / (ran_s + drained_s) * 60, 2),
            deliveries=dict(delivery_states),
            continuations_completed=sum(
                d.delivery_type == "CONTINUATION" and d.state == "COMPLETED" for d in deliveries
            ),
            records=records,
            latency_ms=self.metrics.latencies.percentiles(),
            memory=memory.summary(),
            tms=tms,
            errors=dict(tally.errors),
            problems=problems,
        )
