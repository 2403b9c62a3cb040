"""Locust users that are emulated devices: a soak on many machines with Locust's own tooling.

Each Locust user is one PDS, PPS or TDD. It runs the device's cycle against the TMS (RO-17
to RO-26), and every DIMSE request the device sends is reported as a Locust request named by
what it asked for ("C-FIND", "N-ACTION IN PROGRESS", "N-ACTION COMPLETED", "C-STORE"...)
with its response time, and as a failure with its status when it failed. Locust's web UI,
CSV and HTML reports and its ``--master``/``--worker`` distribution then work unchanged.

Run it with ``tdw-emu soak --locust`` (which also starts the reference TMS and judges the
run) or with ``locust -f`` on the path ``tdw-emu soak --locust-file`` prints. Per machine:

- ``TDW_FLEET_ID`` (default ``W`` and Locust's worker index): the prefix of this machine's
  AE titles and stations, so the TMS can map ``W01*`` to this machine's receiver;
- ``TDW_LISTEN`` (default ``127.0.0.1:0``): where this machine's shared Storage SCP listens
  for the Archive's C-MOVE sub-operations.

pynetdicom runs under Locust's gevent: its threads become greenlets, its socket polling
yields to the hub. Measured in this project: C-ECHO associations under gevent and under
threads showed the same latency (docs/locust.md), so devices run as plain greenlets in the
user, which keeps "one user, one device" literal.

At the end every worker audits its devices' records against the Archive and sends its part
of the verdict to the master, which writes one verdict (``--tdw-verdict``), the same
lost-record verdict as ``tdw-emu soak``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import gevent
import gevent.event
from locust import User, events, task
from locust.runners import MasterRunner, WorkerRunner

from emulator.config import network_settings, parse_seconds
from emulator.metrics import Metrics, RequestDone
from emulator.net.peers import Peer
from emulator.net.shared_receiver import SharedStorageReceiver
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.profile import load_profile
from emulator.soak.fleet import AFTERLOADER_MARK, FleetMember
from emulator.soak.processes import merge_verdicts
from emulator.soak.runner import (
    RetryBackoff,
    RunFacts,
    confirmed_at_archive,
    draw_verdict,
    poll_interval,
    worklist_round,
)
from emulator.soak.verdict import MemoryWatch, Tally, audit_records, sum_audits

LOG = logging.getLogger("tdw.locust")
PARTIAL = "tdw_partial"
HELLO = "tdw_hello"


class DimseFailure(Exception):
    """A request answered with a failure status, or cut off by an abort."""


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("tdw-emu")
    group.add_argument("--tdw-tms", default="TMS@127.0.0.1:11114", help="AET@HOST:PORT")
    group.add_argument("--tdw-archive", default="ARCHIVE@127.0.0.1:11112", help="AET@HOST:PORT")
    group.add_argument("--tdw-time-scale", type=float, default=1.0, help="1 is real time")
    group.add_argument("--tdw-station-prefix", default="SOAK")
    group.add_argument("--tdw-profile", default="ihe-ro-2008")
    group.add_argument("--tdw-verdict", default="soak-verdict.json", help="the master writes it")
    group.add_argument(
        "--tdw-duration",
        default="",
        help="feed work this long (300, 5m), then stop gracefully and judge; use it instead "
        "of --run-time, which quits before the workers' verdicts arrive",
    )
    group.add_argument("--tdw-tls-cert", default="")
    group.add_argument("--tdw-tls-key", default="")
    group.add_argument("--tdw-tls-ca", default="")


class LocustFleet:
    """This process's devices: one shared receiver, one metrics registry, one tally."""

    def __init__(self, environment) -> None:
        self.environment = environment
        options = environment.parsed_options
        self.options = options
        host, _, port = (os.environ.get("TDW_LISTEN") or "127.0.0.1:0").rpartition(":")
        self.data_dir = Path(tempfile.mkdtemp(prefix="tdw-locust-"))
        tls = {
            "tls_cert": options.tdw_tls_cert or None,
            "tls_key": options.tdw_tls_key or None,
            "tls_ca": options.tdw_tls_ca or None,
        }
        self.metrics = Metrics()
        self.metrics.request_listeners.append(self._report)
        self.network = dataclasses.replace(
            network_settings(tls), observers=self.metrics.observers, reactor_poll_s=0.005
        )
        profile = load_profile(options.tdw_profile, "final")
        self.receiver = SharedStorageReceiver(
            profile.sop_classes.archive_storage_uids(),
            host,
            int(port or 0),
            self.network,
            event_class=profile.sop_classes["ups_event"],
        )
        self.receiver.start()
        self.tally = Tally()
        self.records: list[dict] = []
        self.members: list[FleetMember] = []
        self._numbers = {kind: itertools.count(1) for kind in ("pds", "pps", "tdd", "afterloader")}
        self._lock = threading.Lock()
        self.memory = MemoryWatch(30.0)
        self.started = time.monotonic()
        print(f"tdw devices receive on {self.receiver.address}", flush=True)

    @property
    def fleet_id(self) -> str:
        """Known once the master has acknowledged this worker (its index), so read late."""
        runner = self.environment.runner
        index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        return os.environ.get("TDW_FLEET_ID") or f"W{max(index, 0) + 1:02d}"

    def _report(self, done: RequestDone) -> None:
        if done.group != "performer" or done.role != "scu":
            return
        failed = done.category not in ("Success", "Warning")
        self.environment.events.request.fire(
            request_type="DIMSE",
            name=done.name,
            response_time=done.seconds * 1000,
            response_length=0,
            exception=DimseFailure(f"{done.category} 0x{done.status & 0xFFFF:04X}")
            if failed
            else None,
            context={"ae": done.ae},
        )

    def member(self, kind: str) -> FleetMember:
        """The next device of ``kind`` here; the n-th PPS and TDD share a station."""
        with self._lock:
            number = next(self._numbers[kind])
            unit = {"pds": "D", "afterloader": AFTERLOADER_MARK}.get(kind, "P")
            station = f"{self.options.tdw_station_prefix}{self.fleet_id}{unit}{number:03d}"
            member = FleetMember(
                kind, station, f"{self.fleet_id}{kind.upper()}{number:03d}", len(self.members)
            )
            self.members.append(member)
            return member

    def device(self, member: FleetMember) -> PerformingDevice:
        options = self.options
        return PerformingDevice(
            DeviceConfig(
                member.kind,
                member.station,
                member.ae_title,
                Peer.parse(options.tdw_tms),
                Peer.parse(options.tdw_archive),
                self.data_dir / member.ae_title,
                time_scale=options.tdw_time_scale,
                edition=options.tdw_profile,
                network=self.network,
            ),
            metrics=self.metrics,
            inbox=self.receiver,
        )

    def audit(self, device: PerformingDevice, ae_title: str) -> None:
        """The records this device sent, checked at the Archive before it stops."""
        deliveries = [d for d in self.tally.deliveries if d.ae_title == ae_title]
        audit = audit_records(deliveries, lambda uid: confirmed_at_archive(device, uid))
        with self._lock:
            self.records.append(audit)

    def partial(self) -> dict:
        """This process's part of the verdict, as a soak worker writes it."""
        ran = time.monotonic() - self.started
        facts = RunFacts(
            fleet=self.members,
            tally=self.tally,
            ran_s=ran,
            drained_s=0.0,
            memory=self.memory.summary(),
            latency_ms=self.metrics.latencies.percentiles(),
            tms={},
        )
        verdict = draw_verdict(facts, sum_audits(self.records))
        return verdict.as_json() | {
            "latency_samples": self.metrics.latencies.export(),
            "members": [dataclasses.astuple(m) for m in self.members],
        }


FLEET: LocustFleet | None = None
PARTS: dict[str, dict] = {}
HELLOS: set[str] = set()
VERDICT_WRITTEN = gevent.event.Event()


@events.init.add_listener
def _init(environment, **_kwargs) -> None:
    global FLEET
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message(PARTIAL, lambda msg, **_: _part(environment, msg.node_id, msg.data))
        runner.register_message(HELLO, lambda msg, **_: HELLOS.add(msg.node_id))
        return
    for name in ("tdw.device", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.ERROR)
    FLEET = LocustFleet(environment)


@events.test_start.add_listener
def _started(environment, **_kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    VERDICT_WRITTEN.clear()
    duration = environment.parsed_options.tdw_duration
    if duration:
        gevent.spawn(_stop_after, environment, parse_seconds(duration))


def _stop_after(environment, seconds: float) -> None:
    """Stops the users gracefully (each finishes its session within --stop-timeout), waits
    for every worker's part of the verdict, then quits. Locust's own --run-time quits the
    master at once, before the workers' parts can arrive."""
    gevent.sleep(seconds)
    runner = environment.runner
    runner.stop()
    if not VERDICT_WRITTEN.wait(timeout=float(environment.stop_timeout or 0) + 120):
        _write_verdict(environment, missing=sorted(HELLOS - set(PARTS)))
    runner.quit()


@events.test_stop.add_listener
def _stopped(environment, **_kwargs) -> None:
    runner = environment.runner
    if FLEET is None or not FLEET.members:
        return
    partial = FLEET.partial()
    if isinstance(runner, WorkerRunner):
        runner.send_message(PARTIAL, partial)
    else:
        _part(environment, "local", partial)


def _part(environment, node: str, partial: dict) -> None:
    PARTS[node] = partial
    if len(PARTS) >= len(HELLOS):
        _write_verdict(environment, missing=[])


def _write_verdict(environment, missing: list[str]) -> None:
    """The master (or a lone local runner) writes the one verdict."""
    fleet = [FleetMember(*m) for part in PARTS.values() for m in part["members"]]
    problems = [f"worker {node} sent no verdict" for node in missing]
    verdict = merge_verdicts(list(PARTS.values()), fleet, {}, problems)
    path = Path(environment.parsed_options.tdw_verdict)
    verdict.write(path)
    by_worker = {node: len(part["members"]) for node, part in PARTS.items()}
    summary = {"ok": verdict.ok, "devices_by_worker": by_worker, "problems": verdict.problems}
    print(f"tdw verdict {json.dumps(summary)} written to {path}", flush=True)
    environment.process_exit_code = 0 if verdict.ok else 1
    VERDICT_WRITTEN.set()


class DeviceUser(User):
    """One emulated device; a task is one worklist round (a whole session, if there is one).

    Locust's ``--stop-timeout`` must cover a session: a device stopped mid-session would
    leave its UPS IN PROGRESS, which is what this product exists to catch.
    """

    abstract = True
    kind = "pds"

    def wait_time(self) -> float:
        """Between worklist rounds: as a soak's devices poll (runner.poll_interval)."""
        return poll_interval(self.environment.parsed_options.tdw_time_scale)

    def on_start(self) -> None:
        assert FLEET is not None
        if isinstance(self.environment.runner, WorkerRunner) and not FLEET.members:
            self.environment.runner.send_message(HELLO, FLEET.fleet_id)
        self.member = FLEET.member(self.kind)
        self.device = FLEET.device(self.member)
        self.device.start()
        self.backoff = RetryBackoff(random.Random(hash(self.member.ae_title)))

    @task
    def worklist_round(self) -> None:
        _, pause = worklist_round(self.device, FLEET.tally, self.member.ae_title, self.backoff)
        if pause:
            gevent.sleep(pause)

    def on_stop(self) -> None:
        FLEET.audit(self.device, self.member.ae_title)
        self.device.stop()


class PdsUser(DeviceUser):
    kind = "pds"
    weight = 1


class PpsUser(DeviceUser):
    """Pairs with the TDD of the same number on this machine; run PPS and TDD users in
    equal numbers (``--mix pps+tdd=...`` does)."""

    kind = "pps"
    weight = 0


class TddUser(DeviceUser):
    kind = "tdd"
    weight = 0


class AfterloaderUser(DeviceUser):
    """An HDR afterloader; its station carries the afterloader mark, so the TMS feeds it
    brachytherapy patients (emulator/soak/fleet.station_kind)."""

    kind = "afterloader"
    weight = 0


def _apply_mix() -> None:
    """``TDW_MIX`` (as ``tdw-emu soak --mix``) sets the user classes' weights."""
    from emulator.soak.fleet import parse_mix

    mix = parse_mix(os.environ.get("TDW_MIX"))
    total = sum(mix.values())
    PdsUser.weight = round(mix.get("pds", 0) / total * 100)
    PpsUser.weight = TddUser.weight = round(mix.get("pps+tdd", 0) / total * 50)
    AfterloaderUser.weight = round(mix.get("afterloader", 0) / total * 100)


_apply_mix()
