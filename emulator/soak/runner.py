"""Runs many emulated devices in this process for a set time, then drains and judges the run.

Every device has its own thread and simulated machine; all of them receive through one
shared Storage SCP (emulator/net/shared_receiver.py) and share one metrics registry, so a
scrape (or the live summary) sees the whole fleet. Devices start at ``spawn_rate`` a
second, not all at once, and a device whose worklist query fails backs off with jitter
before it asks again. With ``embedded`` the reference TMS and Archive run in the same
process and feed each station as it queries (emulator/reference/feeder.py); against an
external TMS the devices take whatever it schedules for their stations (a ``tdw-emu tms
--feed`` process feeds them the same way). When the time is up feeding stops, the devices
finish what is on their worklists (continuations included) for at most ``drain_s``, and
the verdict is drawn. emulator/soak/processes.py runs several of these, one per core.
"""

from __future__ import annotations

import dataclasses
import math
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
from emulator.net.shared_receiver import SharedStorageReceiver
from emulator.performer.delivery import BeamTask
from emulator.performer.dwell_delivery import ChannelTask
from emulator.performer.tms_link import Backoff, TmsUnavailable
from emulator.performer.workflow import DeviceConfig, PerformingDevice, UpsOutcome
from emulator.profile import load_profile, load_yaml
from emulator.reference.feeder import FeedPlan
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import AFTERLOADER_SMALL, SOAK_PATIENTS, SeedOptions
from emulator.soak.admission import Admission, AdmissionLimits
from emulator.soak.fleet import FleetMember, plan_fleet
from emulator.soak.verdict import (
    MemoryWatch,
    SoakLimits,
    Tally,
    Verdict,
    audit_records,
    judge,
    judge_limits,
    overload_problem,
)

PLACEHOLDER = Peer("TMS", "127.0.0.1", 104)
SESSION_S = 120.0  # about one PDS session at real pace, in device seconds


# Past the drain limit, devices still in a session are stopped and given this long to end
# their UPS (profiles/soak.yaml).
STOP_GRACE_S = float(load_yaml("soak.yaml")["stop_grace_s"])


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
    listen_port: int = 0  # the shared receiver's port; 0 picks a free one
    station_prefix: str = "SOAK"
    edition: str = "ihe-ro-2008"
    uid_set: str = "final"
    device: str = ""  # "": each kind's simulated machine (a linac, an afterloader)
    drain_s: float | None = None  # None: long enough for a session at this time scale
    poll_s: float | None = None  # between empty worklist rounds; None: by the time scale
    warmup_s: float | None = None
    seed: int = 1
    seed_options: SeedOptions = SOAK_PATIENTS
    reactor_poll_s: float | None = 0.005
    network: NetworkSettings = field(default_factory=NetworkSettings)  # e.g. TLS
    spawn_rate: float | None = None  # devices started a second; None: spread over a session
    # The association limit of the shared receiver and the embedded TMS and Archive;
    # None sizes it for the fleet.
    max_associations: int | None = None
    # The fleet members this process runs (a worker's share); None: the whole fleet.
    members: list[FleetMember] | None = None
    # Each device subscribes to the UPS it claims (UPS Watch) and gets its events, as a
    # device that honours cancel requests does; off, a fleet without event traffic.
    watch_claimed_ups: bool = True
    # Latency and memory limits the verdict judges (tdw-emu soak --max-p99-ms and friends).
    limits: SoakLimits = field(default_factory=SoakLimits)
    # Admission's latency bound (tdw-emu soak --admit-p95); None: profiles/soak.yaml's.
    admit_p95_s: float | None = None

    @property
    def drain_limit_s(self) -> float:
        """A session in progress when feeding stops takes about 150 s at real pace."""
        return self.drain_s if self.drain_s is not None else 60.0 + 240.0 * self.time_scale

    @property
    def spawn_per_s(self) -> float:
        """A clinic's devices do not start in step: started within one session's length
        (about 120 s at real pace), their retrievals, images and records do not all reach
        the TMS at the same moment, as they did when 200 devices started in 10 s."""
        if self.spawn_rate is not None:
            return self.spawn_rate
        return min(max(self.devices / (SESSION_S * max(self.time_scale, 0.01)), 1.0), 200.0)

    @property
    def warmup_limit_s(self) -> float:
        """Latency and memory are judged once every device has started and settled."""
        if self.warmup_s is not None:
            return self.warmup_s
        started_here = len(self.members) if self.members else self.devices
        ramp = started_here / self.spawn_per_s
        return min(max(30.0, ramp + 30.0 * min(self.time_scale, 1.0)), self.duration_s / 2)

    @property
    def poll_interval_s(self) -> float:
        """A real device looks at its worklist every few seconds, not five times a second:
        200 idle devices polling at 5 Hz would be 1,000 C-FINDs a second at the TMS."""
        if self.poll_s is not None:
            return self.poll_s
        return poll_interval(self.time_scale)

    @property
    def association_limit(self) -> int:
        return self.max_associations or max(32, 2 * self.devices + 16)

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
        if self.fault_rate and (self.device or "sim").split(":")[0] != "sim":
            raise ValueError("--fault-rate arms simulated interlocks; use the sim device")
        if self.tms is not None and not self.listen_port:
            raise ValueError("with --tms give --listen-port: its Archive sends to that port")
        if self.spawn_rate is not None and self.spawn_rate <= 0:
            raise ValueError("--spawn-rate must be positive")


def poll_interval(time_scale: float) -> float:
    """Seconds between a device's empty worklist rounds: 2 s at real pace, 0.2 s at 0."""
    return 0.2 + 1.8 * min(max(time_scale, 0.0), 1.0)


class RetryBackoff:
    """Pauses after a failed worklist round: doubling from 1 s to 30 s, with full jitter
    (the TMS link's :class:`Backoff`, without its window), so a fleet refused by a busy TMS
    does not come back at one instant."""

    def __init__(self, rng: random.Random, first_s: float = 1.0, max_s: float = 30.0) -> None:
        self.rng = rng
        self.policy = Backoff(window_s=math.inf, first_delay_s=first_s, max_delay_s=max_s)
        self.reset()

    def next_delay(self) -> float:
        return next(self._pauses)

    def reset(self) -> None:
        self._pauses = self.policy.pauses(self.rng)


def worklist_round(
    device: PerformingDevice, tally: Tally, ae_title: str, backoff: RetryBackoff
) -> tuple[list[UpsOutcome], float]:
    """One worklist round of a fleet device, tallied: its outcomes, and how long to pause
    before the next round after a failure (0 after a round that worked)."""
    try:
        outcomes = device.run_once()
    except TmsUnavailable as exc:
        # The TMS refused (Rejected Transient), timed out or dropped for the whole retry
        # window: nothing was claimed, so nothing is lost; ask again later.
        tally.transient(f"{ae_title}: {exc}")
        return [], backoff.next_delay()
    except Exception as exc:  # the TMS answered the worklist query wrongly
        tally.error(f"{ae_title}: {type(exc).__name__}: {exc}")
        return [], backoff.next_delay()
    backoff.reset()
    if outcomes:
        tally.add(ae_title, outcomes)
    return outcomes, 0.0


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
        self.fleet: list[FleetMember] = config.members or plan_fleet(
            config.devices, config.mix, config.station_prefix
        )
        self.tally = Tally()
        self.devices: dict[str, PerformingDevice] = {}
        self.site: ReferenceSite | None = None
        self.receiver: SharedStorageReceiver | None = None
        self.draining = threading.Event()
        self.halt = threading.Event()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        limit = config.association_limit
        admission = config.network.admission
        self.network = dataclasses.replace(
            config.network,
            observers=(*config.network.observers, *self.metrics.observers),
            reactor_poll_s=config.reactor_poll_s,
            maximum_associations=limit,
            # Every device of the fleet connects from this one address.
            admission=dataclasses.replace(
                admission,
                max_pending_per_address=max(admission.max_pending_per_address, limit),
                max_pending=max(admission.max_pending, limit),
            ),
        )
        self.stopped = threading.Event()
        self.stopped_reason = ""
        # No new session while this process is overloaded (profiles/soak.yaml).
        limits = AdmissionLimits.from_profile()
        if config.admit_p95_s is not None:
            limits = dataclasses.replace(limits, max_recent_p95_s=config.admit_p95_s)
        self.admission = Admission(limits, self._results_backlog)
        self.metrics.request_listeners.append(self.admission.observe)

    def _results_backlog(self) -> int:
        """The most results any one device holds that the Archive has not taken yet."""
        return max((len(d.outbox.pending()) for d in list(self.devices.values())), default=0)

    # -- set-up ------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """The operator stopped the soak (a signal): the run phase ends now, every device
        ends the UPS it performs as an operator hold and starts nothing new, and the drain
        and the verdict follow as after a normal run."""
        self.stopped_reason = reason
        self.stopped.set()
        for device in list(self.devices.values()):
            device.stop_work(reason)

    def _fault_injector(self, member: FleetMember, rng: random.Random):
        """At each beam's start, with ``fault_rate``, arms the simulated dosimetry interlock
        somewhere inside that beam. One draw per beam keeps a seeded run reproducible: the
        idle polls between sessions draw nothing."""

        def on_beam_start(task: BeamTask | ChannelTask) -> None:
            if rng.random() >= self.config.fault_rate:
                return
            device = self.devices[member.ae_title].device
            number, start, stop = task.fault_window()
            device.arm_interlock(number, round(start + (stop - start) * rng.uniform(0.1, 0.9), 2))

        return on_beam_start

    def _build_devices(self, root: Path) -> None:
        cfg = self.config
        profile = load_profile(cfg.edition, cfg.uid_set)
        self.receiver = SharedStorageReceiver(
            profile.sop_classes.archive_storage_uids(),
            cfg.listen_host,
            cfg.listen_port,
            self.network,
            event_class=profile.sop_classes["ups_event"],
        )
        self.receiver.start()
        for member in self.fleet:
            rng = random.Random(cfg.seed * 1000 + member.index)
            self.devices[member.ae_title] = PerformingDevice(
                DeviceConfig(
                    member.kind,
                    member.station,
                    member.ae_title,
                    cfg.tms or PLACEHOLDER,
                    cfg.archive or dataclasses.replace(PLACEHOLDER, ae_title="ARCHIVE"),
                    root / "devices" / member.ae_title,
                    listen_host=cfg.listen_host,
                    edition=cfg.edition,
                    uid_set=cfg.uid_set,
                    time_scale=cfg.time_scale,
                    device=cfg.device,
                    network=self.network,
                    watch_claimed_ups=cfg.watch_claimed_ups,
                ),
                on_beam_start=self._fault_injector(member, rng) if cfg.fault_rate else None,
                metrics=self.metrics,
                inbox=self.receiver,
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
                brachy_options=AFTERLOADER_SMALL,
                network=self.network,
            ),
            self.metrics,
        )
        self.site.feed(
            FeedPlan(f"{cfg.station_prefix}*", prime=tuple(sorted({m.station for m in self.fleet})))
        )
        self.site.start()
        tms = Peer("TMS", *self.site.tms.address)
        archive = Peer("ARCHIVE", *self.site.archive.address)
        for device in self.devices.values():
            device.point_at(tms, archive)

    # -- the device loops --------------------------------------------------------------------

    def _loop(self, member: FleetMember, device: PerformingDevice) -> None:
        backoff = RetryBackoff(random.Random(self.config.seed * 7919 + member.index))
        while not self.halt.is_set():
            if not self._admitted():
                return
            with self._busy_lock:
                self._busy.add(member.ae_title)
            try:
                outcomes, pause = worklist_round(device, self.tally, member.ae_title, backoff)
                if pause:
                    self.halt.wait(pause)
            finally:
                with self._busy_lock:
                    self._busy.discard(member.ae_title)
            if outcomes:
                continue
            if self.draining.is_set():
                return
            self.halt.wait(self.config.poll_interval_s)

    # -- the run -----------------------------------------------------------------------------

    def _admitted(self) -> bool:
        """Waits while the process is overloaded; False once the run is draining or over
        (a device held at the gate has no session to finish)."""
        while not self.admission.is_open():
            if self.draining.is_set() or self.halt.is_set():
                return False
            self.halt.wait(0.5)
        return not self.halt.is_set()

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
                if self.receiver is not None:
                    self.receiver.stop()
                if self.site is not None:
                    self.site.stop()

    def _drive(self, on_progress: Callable[[Progress], None] | None) -> Verdict:
        cfg = self.config
        warmup = cfg.warmup_limit_s
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
        spawner = threading.Thread(
            target=self._spawn, args=(threads,), name="soak-spawner", daemon=True
        )
        self.admission.start()
        spawner.start()
        deadline = started + cfg.duration_s
        warm = False
        while time.monotonic() < deadline and not self.stopped.is_set():
            self.stopped.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
            if not warm and time.monotonic() - started >= warmup:
                # Latency and memory are judged in steady state, after the patients are
                # seeded and every device has started its first session.
                self.metrics.latencies.reset()
                warm = True
            if on_progress:
                on_progress(self.progress(started, "running", memory))
        ran_s = time.monotonic() - started
        if self.site is not None and self.site.feeder is not None:
            self.site.feeder.stop()
        self.draining.set()
        spawner.join()
        drain_deadline = time.monotonic() + cfg.drain_limit_s
        while any(t.is_alive() for t in threads) and time.monotonic() < drain_deadline:
            time.sleep(0.5)
            if on_progress:
                on_progress(self.progress(started, "draining", memory))
        if any(t.is_alive() for t in threads):
            # Still in a session past the drain limit: each is stopped as an operator hold
            # (its UPS CANCELED with its record), never left IN PROGRESS.
            for member in self.fleet:
                self.devices[member.ae_title].stop_work("the soak's drain limit was reached")
            grace = time.monotonic() + STOP_GRACE_S
            while any(t.is_alive() for t in threads) and time.monotonic() < grace:
                time.sleep(0.5)
        drained_s = time.monotonic() - started - ran_s
        self.halt.set()
        self.admission.stop()
        stuck = [t.name for t in threads if t.is_alive()]
        for thread in threads:
            if thread.ident is not None:
                thread.join(timeout=30)
        return self._verdict(ran_s, drained_s, memory, stuck)

    def _spawn(self, threads: list[threading.Thread]) -> None:
        """Starts the device loops ``spawn_rate`` a second: a fleet that starts at one
        instant queries, seeds and retrieves at one instant too."""
        interval = 1.0 / self.config.spawn_per_s
        began = time.monotonic()
        for number, thread in enumerate(threads):
            if self.draining.wait(max(began + number * interval - time.monotonic(), 0.0)):
                return
            thread.start()

    # -- the verdict -------------------------------------------------------------------------

    def _archived(self, uid: str, ae_title: str) -> Dataset | None:
        """The Archive's copy of a record, or the device's copy once the Archive confirms it."""
        if self.site is not None:
            instance = self.site.archive.store.get(uid)
            return self.site.archive.store.read(instance) if instance else None
        return confirmed_at_archive(self.devices[ae_title], uid)

    def _verdict(
        self, ran_s: float, drained_s: float, memory: MemoryWatch, stuck: list[str]
    ) -> Verdict:
        deliveries = list(self.tally.deliveries)
        by_uid = {uid: d.ae_title for d in deliveries for uid in d.records}
        records = audit_records(deliveries, lambda uid: self._archived(uid, by_uid[uid]))
        facts = RunFacts(
            fleet=self.fleet,
            tally=self.tally,
            ran_s=ran_s,
            drained_s=drained_s,
            memory=memory.summary(),
            latency_ms=self.metrics.latencies.percentiles(),
            tms=self.site.tms.ups.count_by_state() if self.site is not None else {},
            stuck=stuck,
            limits=self.config.limits,
            overload=self.admission.summary(),
        )
        return draw_verdict(facts, records)


def confirmed_at_archive(device: PerformingDevice, uid: str) -> Dataset | None:
    """The device's copy of a record it sent, once a C-FIND shows the Archive holds it."""
    local = device.receiver.store.get(uid)
    if local is None:
        return None
    record = device.receiver.store.read(local)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = record.StudyInstanceUID
    query.SeriesInstanceUID = record.SeriesInstanceUID
    query.SOPInstanceUID = uid
    cfg = device.config
    try:
        found = scu.find(cfg.ae_title, cfg.archive, query, settings=cfg.network)
    except DimseError:
        return None
    return record if found else None


@dataclass
class RunFacts:
    """What a run measured, for :func:`draw_verdict`."""

    fleet: list[FleetMember]
    tally: Tally
    ran_s: float
    drained_s: float
    memory: dict
    latency_ms: dict
    tms: dict
    stuck: list[str] = field(default_factory=list)
    limits: SoakLimits = field(default_factory=SoakLimits)
    overload: dict = field(default_factory=dict)  # Admission.summary()


def draw_verdict(facts: RunFacts, records: dict) -> Verdict:
    """The verdict of one process's devices (and its TMS counts, where it has them)."""
    tally = facts.tally
    deliveries = list(tally.deliveries)
    interrupted = tally.sessions.get("interrupted", 0)
    continued = sum(
        d.delivery_type == "CONTINUATION" and d.state in ("COMPLETED", "CANCELED")
        for d in deliveries
    )
    interrupted_left = max(interrupted - continued, 0)
    problems = judge(tally, records, facts.tms, interrupted_left)
    problems += judge_limits(facts.limits, facts.latency_ms, facts.memory)
    problems += overload_problem(facts.overload, len(facts.fleet))
    if facts.stuck:
        problems.append(f"still busy after the drain: {', '.join(facts.stuck)}")
    completed = tally.sessions.get("completed", 0)
    delivery_states = Counter(d.state.lower() for d in deliveries)
    delivery_states["continuation"] = sum(d.delivery_type == "CONTINUATION" for d in deliveries)
    elapsed = facts.ran_s + facts.drained_s
    return Verdict(
        devices=len(facts.fleet),
        mix=dict(Counter(m.kind for m in facts.fleet)),
        duration_s=round(facts.ran_s, 1),
        drain_s=round(facts.drained_s, 1),
        sessions={"started": 0, **dict(tally.sessions)},
        sessions_per_minute=round(completed / elapsed * 60, 2) if elapsed else 0.0,
        deliveries=dict(delivery_states),
        continuations_completed=sum(
            d.delivery_type == "CONTINUATION" and d.state == "COMPLETED" for d in deliveries
        ),
        records=records,
        latency_ms=facts.latency_ms,
        memory=facts.memory,
        tms=facts.tms,
        errors=dict(tally.errors),
        problems=problems,
        retried_rounds=sum(tally.transients.values()),
        interrupted_left=interrupted_left,
        limits=facts.limits.as_json(),
        overload=facts.overload,
    )
