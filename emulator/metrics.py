"""Prometheus metrics of the emulated devices and the reference site, defined in one place.

One registry per process, with an ``ae`` label on every series, because a soak run hosts
many devices (and the embedded TMS and Archive) in one process and one scrape must show them
all. Which label sets exist is data (``profiles/metrics.yaml``); they are all created when an
actor is added, so every series is there at 0 from the first scrape and ``rate()`` and the
dashboards have data before the first event. Names follow Prometheus conventions: base units
(seconds, bytes) and ``_total`` on counters (added by prometheus-client).

DIMSE traffic is counted by pynetdicom event handlers passed in through
``NetworkSettings.observers``, as the conformance recorder is: what is counted is what
crossed the socket, and the actor code stays unaware of it.
"""

from __future__ import annotations

import platform
import random
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
import pynetdicom
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from pynetdicom import evt
from pynetdicom.dsutils import decode
from pynetdicom.status import code_to_category

from emulator import __version__
from emulator.net.commands import message_name, operation_of
from emulator.profile import load_yaml

# The ``actor`` label: devices of every kind are "performer"; "tms" and "archive" as such.
ACTOR_PROFILES = {
    "pds": "performer",
    "pps": "performer",
    "tdd": "performer",
    "afterloader": "performer",
}
PENDING = "Pending"


@dataclass(frozen=True)
class RequestDone:
    """One DIMSE request a local AE sent or served, with its final response.

    ``name`` says what the request asked for where the operation alone does not (the UPS
    state an N-ACTION requests): the name a load-testing report groups by.
    """

    ae: str
    group: str
    role: str
    name: str
    seconds: float
    category: str  # pynetdicom's: Success, Warning, Failure, Cancel
    status: int


def metrics_spec() -> dict:
    return load_yaml("metrics.yaml")


class LatencySamples:
    """Bounded reservoir of request latencies per (actor group, role, operation).

    A soak verdict wants p50/p99 from the observations themselves, not from histogram
    buckets; a reservoir of doubles keeps memory flat over an eight-hour run (Vitter's
    algorithm R). The group ("performer", "tms", "archive") keeps the devices' own
    requests apart from the site's C-MOVE sub-operations in the same process.
    """

    def __init__(self, size: int = 20_000, seed: int = 1) -> None:
        self.size = size
        self._samples: dict[tuple[str, str, str], array] = {}
        self._seen: dict[tuple[str, str, str], int] = {}
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def add(self, group: str, role: str, operation: str, seconds: float) -> None:
        key = (group, role, operation)
        with self._lock:
            samples = self._samples.setdefault(key, array("d"))
            seen = self._seen.get(key, 0) + 1
            self._seen[key] = seen
            if len(samples) < self.size:
                samples.append(seconds)
            else:
                slot = self._random.randrange(seen)
                if slot < self.size:
                    samples[slot] = seconds

    def percentiles(
        self,
        group: str = "performer",
        role: str = "scu",
        quantiles: tuple[float, ...] = (50, 90, 95, 99),
    ) -> dict:
        """{operation: {"count": n, "p50_ms": ..., ...}} over this group's requests, and "all"."""
        with self._lock:
            items = {
                op: list(s) for (g, r, op), s in self._samples.items() if (g, r) == (group, role)
            }
            seen = {op: n for (g, r, op), n in self._seen.items() if (g, r) == (group, role)}
        out = {op: _summary(samples, seen[op], quantiles) for op, samples in sorted(items.items())}
        everything = [value for samples in items.values() for value in samples]
        if everything:
            out["all"] = _summary(everything, sum(seen.values()), quantiles)
        return out

    def reset(self) -> None:
        with self._lock:
            self._samples.clear()
            self._seen.clear()

    def export(self) -> list[dict]:
        """The reservoirs as JSON, for a soak worker to hand its samples to the coordinator."""
        with self._lock:
            return [
                {"key": list(key), "seen": self._seen[key], "samples": list(samples)}
                for key, samples in self._samples.items()
            ]

    def merge(self, exported: list[dict]) -> None:
        """Adds another process's reservoirs: one verdict over every worker's requests."""
        with self._lock:
            for item in exported:
                key = tuple(item["key"])
                self._samples.setdefault(key, array("d")).extend(item["samples"])
                self._seen[key] = self._seen.get(key, 0) + int(item["seen"])


def _summary(samples: list[float], count: int, quantiles: tuple[float, ...]) -> dict:
    values = np.percentile(np.asarray(samples) * 1000, quantiles)
    return {"count": count} | {
        f"p{q:g}_ms": round(float(v), 3) for q, v in zip(quantiles, values, strict=True)
    }


class _WorkitemCollector:
    """``tdw_tms_workitems{ae,state}``: read from the TMS's UPS store at scrape time."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], dict[str, int]]] = {}

    def collect(self):
        family = GaugeMetricFamily(
            "tdw_tms_workitems", "UPS held by the TMS, by state", labels=["ae", "state"]
        )
        states = metrics_spec()["ups_states"]
        for ae, source in list(self.sources.items()):
            try:
                counts = source()
            except Exception:  # a store closing during a scrape: report nothing for it
                continue
            for state in states:
                family.add_metric([ae, state], counts.get(state, 0))
        yield family


class Metrics:
    """Every tdw metric of one process, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double what is scraped and no dashboard reads them.
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        spec = metrics_spec()
        self.spec = spec
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info(
            "tdw_build", "tdw-emulator build and the libraries it talks DICOM with", registry=r
        ).info(
            {
                "version": __version__,
                "pydicom": pydicom.__version__,
                "pynetdicom": pynetdicom.__version__,
                "python": platform.python_version(),
            }
        )
        self.actor_info = Gauge(
            "tdw_actor_info",
            "An emulated device or reference AE in this process",
            ["ae", "kind", "station"],
            registry=r,
        )
        self.dimse_requests = Counter(
            "tdw_dimse_requests",
            "DIMSE requests by operation and final status category (PS3.7 Annex C)",
            ["ae", "actor", "role", "operation", "status"],
            registry=r,
        )
        self.dimse_duration = Histogram(
            "tdw_dimse_request_duration_seconds",
            "Request to final response, as seen by this AE",
            ["ae", "actor", "role", "operation"],
            buckets=[float(b) for b in spec["dimse_latency_buckets"]],
            registry=r,
        )
        self.associations = Counter(
            "tdw_associations", "Association events", ["ae", "role", "event"], registry=r
        )
        self.associations_open = Gauge(
            "tdw_associations_open", "Associations open now", ["ae", "role"], registry=r
        )
        self.ups_transitions = Counter(
            "tdw_ups_transitions",
            "UPS state changes accepted, by new state",
            ["ae", "state"],
            registry=r,
        )
        self.sessions = Counter(
            "tdw_sessions", "Sessions a device took, by outcome", ["ae", "outcome"], registry=r
        )
        self.beams = Counter(
            "tdw_beams", "Beams delivered, by termination", ["ae", "termination"], registry=r
        )
        self.channels = Counter(
            "tdw_channels",
            "Afterloader channels treated, by termination",
            ["ae", "termination"],
            registry=r,
        )
        self.source_seconds = Counter(
            "tdw_source_seconds_delivered",
            "Afterloader source time at dwell positions, in seconds",
            ["ae"],
            registry=r,
        )
        self.meterset = Counter(
            "tdw_meterset_delivered",
            "Meterset delivered, in the plan's meterset unit (MU)",
            ["ae"],
            registry=r,
        )
        self.interlocks = Counter(
            "tdw_interlocks", "Beams ended by a machine interlock", ["ae"], registry=r
        )
        self.faults = Counter(
            "tdw_device_faults",
            "Faults a device met: errors that made it cancel a UPS, or a flagged beam, by kind",
            ["ae", "kind"],
            registry=r,
        )
        self.link_frames = Counter(
            "tdw_link_frames", "Device-link data frames", ["ae", "direction"], registry=r
        )
        self.link_errors = Counter(
            "tdw_link_errors", "Device-link errors, by kind", ["ae", "kind"], registry=r
        )
        self.link_round_trip = Histogram(
            "tdw_link_round_trip_seconds",
            "Device-link frame sent to its ACK",
            ["ae"],
            buckets=[float(b) for b in spec["link_round_trip_buckets"]],
            registry=r,
        )
        self.backlog = Gauge(
            "tdw_results_backlog",
            "Results built but not yet acknowledged by the Archive",
            ["ae"],
            registry=r,
        )
        self.connected = Gauge(
            "tdw_device_connected", "1 while the device is connected", ["ae"], registry=r
        )
        self.connections_refused = Counter(
            "tdw_connections_refused",
            "Connections closed before they became an association, by reason",
            ["ae", "reason"],
            registry=r,
        )
        self.final_pending = Gauge(
            "tdw_final_transitions_pending",
            "UPS whose COMPLETED or CANCELED the TMS has not accepted yet (retried)",
            ["ae"],
            registry=r,
        )
        self.ups_events = Counter(
            "tdw_ups_events",
            "UPS Event N-EVENT-REPORTs sent to subscribers, by event and outcome",
            ["ae", "event", "outcome"],
            registry=r,
        )
        self.ups_events_owed = Gauge(
            "tdw_ups_events_owed",
            "UPS events made and not yet delivered to their subscriber (kept across restarts)",
            ["ae"],
            registry=r,
        )
        self._workitems = _WorkitemCollector()
        r.register(self._workitems)
        self.latencies = LatencySamples()
        self._groups: dict[str, str] = {}
        self._pending: dict[int, dict[int, tuple[float, str, str, str, str]]] = {}
        self._established: set[int] = set()
        self._lock = threading.Lock()
        # Told of every finished request (e.g. a Locust reporter); called in the thread
        # that received the response, so a listener must not block.
        self.request_listeners: list[Callable[[RequestDone], None]] = []

    def connection_refused(self, ae: str, reason: str) -> None:
        """A connection the admission guard closed (emulator/net/connection_guard.py)."""
        self.connections_refused.labels(ae, reason).inc()

    # -- actors ------------------------------------------------------------------------------

    def add_actor(self, ae: str, kind: str, station: str = "") -> ActorMetrics:
        """Creates every label set of this actor (see ``profiles/metrics.yaml``)."""
        spec = self.spec
        profile = ACTOR_PROFILES.get(kind, kind)
        self._groups[ae] = profile
        self.actor_info.labels(ae, kind, station).set(1)
        for role, operations in spec["exchanges"].get(profile, {}).items():
            for op in operations:
                self.dimse_duration.labels(ae, profile, role, op)
                for status in spec["statuses"]:
                    self.dimse_requests.labels(ae, profile, role, op, status)
        for role in ("requestor", "acceptor"):
            self.associations_open.labels(ae, role)
            for event in spec["associations"]["events"]:
                self.associations.labels(ae, role, event)
        if profile in ("performer", "tms"):
            for state in spec["ups_states"]:
                self.ups_transitions.labels(ae, state)
        if profile == "tms":
            for event in spec["ups_events"]:
                for outcome in spec["ups_event_outcomes"]:
                    self.ups_events.labels(ae, event, outcome)
            self.ups_events_owed.labels(ae)
        if profile == "performer":
            for outcome in spec["session_outcomes"]:
                self.sessions.labels(ae, outcome)
            for termination in spec["beam_terminations"]:
                self.beams.labels(ae, termination)
                self.channels.labels(ae, termination)
            for kind_ in spec["device_fault_kinds"]:
                self.faults.labels(ae, kind_)
            for direction in spec["link"]["directions"]:
                self.link_frames.labels(ae, direction)
            for error in spec["link"]["errors"]:
                self.link_errors.labels(ae, error)
            self.meterset.labels(ae)
            self.source_seconds.labels(ae)
            self.interlocks.labels(ae)
            self.link_round_trip.labels(ae)
            self.backlog.labels(ae)
            self.connected.labels(ae)
            self.final_pending.labels(ae)
        return ActorMetrics(self, ae)

    def watch_workitems(self, ae: str, counts: Callable[[], dict[str, int]]) -> None:
        """Reports ``counts()`` (UPS by lower-case state) as ``tdw_tms_workitems`` per scrape."""
        self._workitems.sources[ae] = counts

    def forget_workitems(self, ae: str) -> None:
        self._workitems.sources.pop(ae, None)

    # -- DIMSE observers ----------------------------------------------------------------------

    @property
    def observers(self) -> tuple:
        """(event, handler) pairs for ``NetworkSettings.observers``."""
        return (
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_DIMSE_SENT, self._on_sent),
            (evt.EVT_DIMSE_RECV, self._on_received),
        )

    @staticmethod
    def _local(event: evt.Event) -> tuple[str, str]:
        assoc = event.assoc
        if assoc.is_requestor:
            return str(assoc.requestor.ae_title).strip(), "requestor"
        return str(assoc.acceptor.ae_title).strip(), "acceptor"

    def _on_established(self, event: evt.Event) -> None:
        ae, role = self._local(event)
        with self._lock:
            self._established.add(id(event.assoc))
        self.associations.labels(ae, role, "established").inc()
        self.associations_open.labels(ae, role).inc()

    def _close(self, event: evt.Event, how: str) -> None:
        ae, role = self._local(event)
        key = id(event.assoc)
        with self._lock:
            was_open = key in self._established
            self._established.discard(key)
            unanswered = self._pending.pop(key, {})
        self.associations.labels(ae, role, how).inc()
        if was_open:
            self.associations_open.labels(ae, role).dec()
        now = time.perf_counter()
        for started, req_role, operation, req_ae, detail in unanswered.values():
            group = self._groups.get(req_ae, "other")
            self.dimse_requests.labels(req_ae, group, req_role, operation, "aborted").inc()
            for listener in self.request_listeners:
                listener(RequestDone(req_ae, group, req_role, detail, now - started, how, -1))

    def _on_released(self, event: evt.Event) -> None:
        self._close(event, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._close(event, "aborted")

    def _on_rejected(self, event: evt.Event) -> None:
        ae, role = self._local(event)
        self.associations.labels(ae, role, "rejected").inc()

    def _on_sent(self, event: evt.Event) -> None:
        self._message(event, sent=True)

    def _on_received(self, event: evt.Event) -> None:
        self._message(event, sent=False)

    def _message(self, event: evt.Event, sent: bool) -> None:
        command = event.message.command_set
        name = message_name(int(command.get("CommandField", 0) or 0))
        if name in ("UNKNOWN", "C-CANCEL-RQ"):
            return
        key = id(event.assoc)
        now = time.perf_counter()
        if name.endswith("-RQ"):
            if "MessageID" not in command:
                return
            ae, _ = self._local(event)
            role = "scu" if sent else "scp"
            operation = operation_of(name)
            detail = request_detail(event, operation) if self.request_listeners else operation
            with self._lock:
                self._pending.setdefault(key, {})[int(command.MessageID)] = (
                    now,
                    role,
                    operation,
                    ae,
                    detail,
                )
            return
        status = command.get("Status")
        if status is None or "MessageIDBeingRespondedTo" not in command:
            return
        category = code_to_category(int(status))
        if category == PENDING:
            return
        with self._lock:
            request = self._pending.get(key, {}).pop(int(command.MessageIDBeingRespondedTo), None)
        if request is None:
            return
        started, role, operation, ae, detail = request
        seconds = now - started
        group = self._groups.get(ae, "other")
        self.dimse_requests.labels(ae, group, role, operation, category.lower()).inc()
        self.dimse_duration.labels(ae, group, role, operation).observe(seconds)
        self.latencies.add(group, role, operation, seconds)
        if self.request_listeners:
            done = RequestDone(ae, group, role, detail, seconds, category, int(status))
            for listener in self.request_listeners:
                listener(done)

    # -- exposition ---------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Starts ``/metrics`` on ``host:port`` (port 0: a free one); loopback by default."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


def request_detail(event: evt.Event, operation: str) -> str:
    """``N-ACTION IN PROGRESS`` for a state change, ``N-ACTION cancel request`` for a request
    to cancel, the operation alone otherwise: what a load report should group by."""
    if operation != "N-ACTION":
        return operation
    command = event.message.command_set
    if int(command.get("ActionTypeID", 0) or 0) == 2:
        return "N-ACTION cancel request"
    try:
        context = event.assoc._accepted_cx[event.message.context_id]
        syntax = context.transfer_syntax[0]
        dataset = decode(event.message.data_set, syntax.is_implicit_VR, syntax.is_little_endian)
        return f"N-ACTION {dataset.ProcedureStepState}"
    except Exception:  # a malformed request is the peer's to refuse, not ours to name
        return operation


@dataclass
class MetricsServer:
    server: object
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@dataclass
class ActorMetrics:
    """One actor's series; also the device-link observer (``devices.link.LinkObserver``)."""

    metrics: Metrics
    ae: str
    pending: int = 0  # the backlog, readable without a registry scrape

    def ups_transition(self, state: str) -> None:
        self.metrics.ups_transitions.labels(self.ae, state.lower().replace(" ", "_")).inc()

    def session(self, outcome: str) -> None:
        self.metrics.sessions.labels(self.ae, outcome).inc()

    def ups_event(self, event_name: str, delivered: bool) -> None:
        label = event_name.lower().replace(" ", "_")
        outcome = "delivered" if delivered else "retried"
        self.metrics.ups_events.labels(self.ae, label, outcome).inc()

    def set_events_owed(self, count: int) -> None:
        self.metrics.ups_events_owed.labels(self.ae).set(count)

    def channel(self, termination: str, seconds: float) -> None:
        """An afterloader channel treated: its termination and its source time."""
        self.metrics.channels.labels(self.ae, termination.lower()).inc()
        if seconds > 0:
            self.metrics.source_seconds.labels(self.ae).inc(seconds)
        if termination.upper() == "MACHINE":
            self.metrics.interlocks.labels(self.ae).inc()

    def beam(self, termination: str, meterset: float) -> None:
        self.metrics.beams.labels(self.ae, termination.lower()).inc()
        if meterset > 0:
            self.metrics.meterset.labels(self.ae).inc(meterset)
        if termination.upper() == "MACHINE":
            self.metrics.interlocks.labels(self.ae).inc()

    def fault(self, kind: str) -> None:
        self.metrics.faults.labels(self.ae, kind).inc()

    def set_backlog(self, count: int) -> None:
        """Results spooled but not yet acknowledged by the Archive (the device's outbox)."""
        self.metrics.backlog.labels(self.ae).set(count)
        self.pending = count

    def set_connected(self, connected: bool) -> None:
        self.metrics.connected.labels(self.ae).set(1 if connected else 0)

    def set_final_pending(self, count: int) -> None:
        """UPS journaled as "final transition pending": the TMS refused or could not be
        reached for their COMPLETED or CANCELED, and the device keeps trying."""
        self.metrics.final_pending.labels(self.ae).set(count)

    # devices.link.LinkObserver
    def link_frame(self, direction: str) -> None:
        self.metrics.link_frames.labels(self.ae, direction).inc()

    def link_error(self, kind: str) -> None:
        self.metrics.link_errors.labels(self.ae, kind).inc()
        if kind == "lost":
            self.set_connected(False)

    def link_round_trip(self, seconds: float) -> None:
        self.metrics.link_round_trip.labels(self.ae).observe(seconds)
        self.set_connected(True)


_DEFAULT: Metrics | None = None
_DEFAULT_LOCK = threading.Lock()


def default_metrics() -> Metrics:
    """The process's metrics, for actors built without an explicit ``Metrics``."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Metrics()
        return _DEFAULT
