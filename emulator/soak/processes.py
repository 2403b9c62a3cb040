"""A soak on every core: the reference TMS in its own process, the fleet in worker processes.

One Python process runs one core's worth of devices (the GIL), so a fleet of hundreds is
split across ``workers`` processes (emulator/soak/worker.py), interleaved so each gets the
same mix. With the embedded site, the reference TMS and Archive run as a ``tdw-emu tms``
child that feeds the fleet's stations as they query (``--feed``) for the run's duration;
each worker's shared receiver is a peer of the Archive. At the end the workers' partial
verdicts, drawn against the Archive, and their raw latency samples are merged, the TMS is
stopped and its UPS table is read: one verdict for the whole fleet. Each process serves its
own /metrics when asked; ``FleetEndpoints.targets_path`` (``--metrics-targets``) lists them
all for Prometheus's file-based discovery, so one dashboard sums the fleet.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from emulator.cli_process import printed_metrics_urls
from emulator.metrics import LatencySamples
from emulator.net.peers import Peer
from emulator.net.ports import free_port
from emulator.soak.fleet import FleetMember, plan_fleet
from emulator.soak.runner import STOP_GRACE_S, Progress, SoakConfig
from emulator.soak.tms_process import ReferenceTmsProcess
from emulator.soak.verdict import (
    SoakLimits,
    Tally,
    Verdict,
    judge,
    judge_limits,
    merge_overloads,
    overload_problem,
    sum_audits,
)
from emulator.soak.worker import spec_config, write_json

GRACE_S = 120.0  # past duration and drain, before a silent worker is judged stuck


@dataclasses.dataclass
class FleetEndpoints:
    """Where the coordinator's children serve: what the metrics view scrapes."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # the TMS on this port, worker k on port + k; 0: free
    # Prometheus file-based discovery (file_sd_configs) of every /metrics above.
    targets_path: Path = Path("soak-targets.json")


class ProcessFleet:
    """Runs ``config`` as one TMS process and ``workers`` device processes."""

    def __init__(
        self,
        config: SoakConfig,
        workers: int,
        network_values: dict,
        endpoints: FleetEndpoints | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.network_values = {k: v for k, v in network_values.items() if v is not None}
        self.endpoints = endpoints or FleetEndpoints()
        self.fleet = plan_fleet(config.devices, config.mix, config.station_prefix)
        self.shares = [s for s in (self.fleet[k::workers] for k in range(workers)) if s]
        # Worker k's shared receiver: --listen-port + k - 1, or a free port.
        base = config.listen_port
        self.receiver_ports = [base + k if base else free_port() for k in range(len(self.shares))]
        self.tms: ReferenceTmsProcess | None = None
        self.metrics_urls: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self.stopped_reason = ""

    def _port(self, offset: int) -> int | None:
        base = self.endpoints.metrics_port
        if base is None:
            return None
        return base + offset if base else 0

    # -- the processes -------------------------------------------------------------------------

    def _start_tms(self, root: Path, receivers: list[int]) -> tuple[Peer, Peer]:
        port = self._port(0)
        metrics = None if port is None else (self.endpoints.metrics_host, port)
        self.tms = ReferenceTmsProcess(self.config, root, self.network_values, metrics)
        peers = [
            Peer(member.ae_title, self.config.listen_host, port)
            for share, port in zip(self.shares, receivers, strict=True)
            for member in share
        ]
        addresses = self.tms.start(peers, sorted({member.station for member in self.fleet}))
        self.metrics_urls += self.tms.metrics_urls
        return addresses

    def _spec(self, number: int, share: list[FleetMember], root: Path, peers, port: int) -> dict:
        # The fleet's spawn rate, shared out: together the workers start it at that pace.
        rate = self.config.spawn_per_s * len(share) / len(self.fleet)
        config = dataclasses.replace(self.config, listen_port=port, spawn_rate=rate)
        work = root / f"worker-{number}"
        work.mkdir(parents=True, exist_ok=True)
        return {
            "config": spec_config(config),
            "tms": str(peers[0]),
            "archive": str(peers[1]),
            "members": [dataclasses.astuple(member) for member in share],
            "network": self.network_values,
            "data_dir": str(work),
            "metrics_host": self.endpoints.metrics_host,
            "metrics_port": self._port(number),
            "progress": str(work / "progress.json"),
            "result": str(work / "result.json"),
        }

    def _start_worker(self, spec: dict, root: Path, number: int) -> subprocess.Popen:
        path = root / f"worker-{number}" / "spec.json"
        path.write_text(json.dumps(spec))
        log = (root / f"worker-{number}" / "worker.log").open("w")
        return subprocess.Popen(
            [sys.executable, "-m", "emulator.soak.worker", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def run(self, on_progress: Callable[[Progress], None] | None = None) -> Verdict:
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="tdw-soak-") as tmp:
            root = Path(cfg.data_dir) if cfg.data_dir else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            receivers = self.receiver_ports
            try:
                peers = self._start_tms(root, receivers) if cfg.embedded else (cfg.tms, cfg.archive)
                specs = [
                    self._spec(k, share, root, peers, port)
                    for k, (share, port) in enumerate(
                        zip(self.shares, receivers, strict=True), start=1
                    )
                ]
                processes = [self._start_worker(s, root, k) for k, s in enumerate(specs, 1)]
                self._processes = processes
                if self.stopped_reason:  # stopped while the workers were starting
                    self.stop(self.stopped_reason)
                self._wait(processes, specs, on_progress)
            finally:
                if self.tms is not None:
                    self.tms.stop()
            return self._verdict(specs, processes)

    def stop(self, reason: str) -> None:
        """The operator stopped the soak: each worker is told (SIGTERM) to end its
        devices' sessions and return its part of the verdict; this waits for them."""
        self.stopped_reason = reason
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def _wait(self, processes, specs, on_progress) -> None:
        started = time.monotonic()
        limit = started + self.config.duration_s + self.config.drain_limit_s + GRACE_S
        self._write_targets(specs)
        asked = False
        while any(p.poll() is None for p in processes):
            if time.monotonic() > limit and not asked:
                # Past the run, the drain and its grace: each worker is told to end its
                # sessions and still write its part of the verdict (SIGTERM).
                self.stop("the run went past its drain limit")
                asked, limit = True, time.monotonic() + STOP_GRACE_S + GRACE_S
            elif time.monotonic() > limit:
                for process in processes:
                    process.kill()
                break
            time.sleep(1.0)
            if on_progress:
                on_progress(merged_progress([_read(Path(s["progress"])) for s in specs]))

    def _write_targets(self, specs: list[dict]) -> None:
        """Every /metrics of the fleet, for Prometheus ``file_sd_configs``."""
        deadline = time.monotonic() + 30
        for spec in specs:
            if spec["metrics_port"] is None:
                continue
            log = Path(spec["data_dir"]) / "worker.log"
            while time.monotonic() < deadline:
                urls = printed_metrics_urls(_lines(log))
                if urls:
                    self.metrics_urls.append(urls[0])
                    break
                time.sleep(0.2)
        if not self.metrics_urls:
            return
        targets = [url.split("//", 1)[1].split("/", 1)[0] for url in self.metrics_urls]
        path = self.endpoints.targets_path
        write_json(path, [{"targets": targets}])
        for url in self.metrics_urls:
            print(f"metrics on {url}", flush=True)
        print(f"prometheus targets in {path.resolve()}", flush=True)

    # -- one verdict ---------------------------------------------------------------------------

    def _verdict(self, specs: list[dict], processes) -> Verdict:
        parts, problems = [], []
        for number, (spec, process) in enumerate(zip(specs, processes, strict=True), start=1):
            result = _read(Path(spec["result"]))
            if not result:
                log = Path(spec["data_dir"]) / "worker.log"
                problems.append(
                    f"worker {number} ended (exit {process.returncode}) without a verdict: "
                    + " | ".join(_lines(log)[-3:])
                )
                continue
            parts.append(result)
        tms = self.tms.ups_counts() if self.tms is not None else {}
        return merge_verdicts(parts, self.fleet, tms, problems, self.config.limits)


def merge_verdicts(
    parts: list[dict],
    fleet: list[FleetMember],
    tms: dict[str, int],
    problems: list[str],
    limits: SoakLimits | None = None,
) -> Verdict:
    """The workers' partial verdicts as one, judged again over the sums (and the limits
    over the merged percentiles and the summed memory)."""
    limits = limits or SoakLimits()
    sessions, deliveries, errors = Counter(), Counter(), Counter()
    latencies = LatencySamples(size=10**9)
    for part in parts:
        sessions.update(part["sessions"])
        deliveries.update(part["deliveries"])
        errors.update(part["errors"])
        latencies.merge(part["latency_samples"])
        problems += [p for p in part["problems"] if p.startswith("still busy")]
    audit = sum_audits([part["records"] for part in parts])
    tally = Tally(sessions=sessions, errors=errors)
    interrupted_left = sum(part["interrupted_left"] for part in parts)
    duration = max((part["duration_s"] for part in parts), default=0.0)
    drain = max((part["drain_s"] for part in parts), default=0.0)
    if not parts:
        problems.append("no worker returned a verdict")
    memory_keys = (
        "rss_start_mib",
        "rss_after_warmup_mib",
        "rss_end_mib",
        "rss_peak_mib",
        "growth_mib",
    )
    memory = {"workers": len(parts), "warmup_s": parts[0]["memory"]["warmup_s"] if parts else 0}
    memory |= {k: round(sum(p["memory"][k] for p in parts), 1) for k in memory_keys}
    rates = [p["memory"].get("growth_mib_per_hour") for p in parts]
    memory["growth_mib_per_hour"] = round(sum(rates), 1) if rates and None not in rates else None
    memory["window_s"] = min((p["memory"].get("window_s", 0.0) for p in parts), default=0.0)
    latency_ms = latencies.percentiles()
    overload = merge_overloads([part.get("overload", {}) for part in parts])
    return Verdict(
        devices=len(fleet),
        mix=dict(Counter(m.kind for m in fleet)),
        duration_s=duration,
        drain_s=drain,
        sessions={"started": 0, **dict(sessions)},
        sessions_per_minute=round(sessions.get("completed", 0) / max(duration + drain, 1) * 60, 2),
        deliveries=dict(deliveries),
        continuations_completed=sum(part["continuations_completed"] for part in parts),
        records=audit,
        latency_ms=latency_ms,
        memory=memory,
        tms=tms,
        errors=dict(errors),
        problems=[
            *problems,
            *judge(tally, audit, tms, interrupted_left),
            *judge_limits(limits, latency_ms, memory),
            *overload_problem(overload, len(fleet)),
        ],
        retried_rounds=sum(part["retried_rounds"] for part in parts),
        interrupted_left=interrupted_left,
        limits=limits.as_json(),
        overload=overload,
    )


def merged_progress(reports: list[dict]) -> Progress:
    """The workers' live figures as one line: sums, and the worst p99."""
    reports = [r for r in reports if r]
    sessions: Counter = Counter()
    for report in reports:
        sessions.update(report["tally"]["sessions"])

    def total(key: str) -> float:
        return sum(report["tally"][key] for report in reports)

    return Progress(
        elapsed_s=max((r["elapsed_s"] for r in reports), default=0.0),
        phase="running" if any(r["phase"] == "running" for r in reports) else "draining",
        busy=sum(r["busy"] for r in reports),
        devices=sum(r["devices"] for r in reports),
        tally={
            "sessions": dict(sessions),
            "deliveries": total("deliveries"),
            "continuations_completed": total("continuations_completed"),
            "records_stored": total("records_stored"),
        },
        latency={
            "p50_ms": max((r["latency"].get("p50_ms", 0) for r in reports), default=0),
            "p99_ms": max((r["latency"].get("p99_ms", 0) for r in reports), default=0),
        },
        backlog=sum(r["backlog"] for r in reports),
        rss_mib=round(sum(r["rss_mib"] for r in reports), 1),
    )


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
