"""``tdw-emu soak --locust``: the reference TMS, a Locust master and its workers, one verdict.

On one machine this stands in for the many-machine set-up of docs/locust.md: the workers
are local processes (one per core by default), each with its own fleet id (``W01``...) and
shared receiver, and the TMS process maps each fleet id's AE title pattern to that
receiver. Locust runs headless and writes its CSV and HTML reports; its master writes the
lost-record verdict from the workers' parts (emulator/soak/locustfile.py). When it has
ended, the TMS is stopped and its UPS table is read, so a UPS left IN PROGRESS fails the
verdict as it does for ``tdw-emu soak``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from emulator.config import tls_file_flags
from emulator.net.peers import Peer
from emulator.net.ports import free_port
from emulator.soak import locustfile_path
from emulator.soak.fleet import AFTERLOADER_MARK
from emulator.soak.runner import SoakConfig
from emulator.soak.tms_process import ReferenceTmsProcess
from emulator.soak.verdict import Verdict

GRACE_S = 300.0


@dataclasses.dataclass
class LocustOptions:
    workers: int  # local worker processes; 0 runs Locust alone, without a master
    report_dir: Path
    extra_args: list[str] = dataclasses.field(default_factory=list)  # passed to the master


class LocustSoak:
    """Runs ``config`` as Locust users against the reference TMS (or ``config.tms``)."""

    def __init__(self, config: SoakConfig, options: LocustOptions, network_values: dict) -> None:
        config.validate()
        self.config = config
        self.options = options
        self.network_values = {k: v for k, v in network_values.items() if v is not None}
        self.tms: ReferenceTmsProcess | None = None

    def _fleet_ids(self) -> list[str]:
        return [f"W{k:02d}" for k in range(1, max(self.options.workers, 1) + 1)]

    def _expected_stations(self, fleet_ids: list[str]) -> list[str]:
        """The stations Locust's users will ask for (locustfile.LocustFleet.member names
        them), to prime: each worker gets about its share of each kind."""
        share = -(-self.config.devices // len(fleet_ids)) + 1
        named = (("D", "pds"), ("P", "pps+tdd"), (AFTERLOADER_MARK, "afterloader"))
        units = [unit for unit, name in named if name in self.config.mix]
        return [
            f"{self.config.station_prefix}{fid}{unit}{n:03d}"
            for fid in fleet_ids
            for unit in units
            for n in range(1, share + 1)
        ]

    def _environment(self, fleet_id: str, port: int) -> dict[str, str]:
        mix = ",".join(f"{unit}={weight}" for unit, weight in self.config.mix.items())
        return os.environ | {
            "TDW_FLEET_ID": fleet_id,
            "TDW_LISTEN": f"{self.config.listen_host}:{port}",
            "TDW_MIX": mix,
        }

    def _locust(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "locust", "-f", str(locustfile_path()), *args]

    def _master_args(self, tms: Peer, archive: Peer, verdict: Path) -> list[str]:
        cfg, report = self.config, self.options.report_dir
        return [
            "--headless",
            "-u", str(cfg.devices),
            "-r", str(cfg.spawn_per_s),
            "--stop-timeout", str(int(cfg.drain_limit_s)),
            "--tdw-duration", f"{cfg.duration_s}s",
            "--tdw-tms", str(tms),
            "--tdw-archive", str(archive),
            "--tdw-time-scale", str(cfg.time_scale),
            "--tdw-station-prefix", cfg.station_prefix,
            "--tdw-profile", cfg.edition,
            "--tdw-verdict", str(verdict),
            "--csv", str(report / "locust"),
            "--html", str(report / "locust.html"),
            *tls_file_flags(self.network_values, prefix="--tdw-"),
            *self.options.extra_args,
        ]  # fmt: skip

    def run(self) -> Verdict:
        cfg = self.config
        self.options.report_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tdw-locust-") as tmp:
            root = Path(cfg.data_dir) if cfg.data_dir else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            fleet_ids = self._fleet_ids()
            base = cfg.listen_port
            ports = [base + k if base else free_port() for k in range(len(fleet_ids))]
            verdict_path = root / "locust-verdict.json"
            processes: list[subprocess.Popen] = []
            try:
                if cfg.embedded:
                    self.tms = ReferenceTmsProcess(cfg, root, self.network_values)
                    peers = [
                        Peer(f"{fid}*", cfg.listen_host, port)
                        for fid, port in zip(fleet_ids, ports, strict=True)
                    ]
                    tms, archive = self.tms.start(peers, self._expected_stations(fleet_ids))
                else:
                    tms, archive = cfg.tms, cfg.archive
                master = self._start(root, fleet_ids, ports, (tms, archive, verdict_path))
                processes = master
                try:
                    master[0].wait(timeout=cfg.duration_s + cfg.drain_limit_s + GRACE_S)
                except subprocess.TimeoutExpired:
                    master[0].kill()
                for process in processes[1:]:
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                if self.tms is not None:
                    self.tms.stop()
            return self._verdict(verdict_path, root)

    def _start(self, root: Path, fleet_ids: list[str], ports: list[int], where) -> list:
        """The master (or the lone local runner) first, then the workers."""
        tms, archive, verdict = where
        log = root / "locust-master.log"
        args = self._master_args(tms, archive, verdict)
        if self.options.workers == 0:
            env = self._environment(fleet_ids[0], ports[0])
            return [_popen(self._locust(*args), env, log)]
        master_port = free_port()
        master = _popen(
            self._locust(
                *args,
                "--master",
                "--master-bind-host", "127.0.0.1",
                "--master-bind-port", str(master_port),
                "--expect-workers", str(self.options.workers),
            ),
            self._environment("", 0),
            log,
        )  # fmt: skip
        workers = [
            _popen(
                self._locust(
                    "--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port)
                ),
                self._environment(fid, port),
                root / f"locust-{fid}.log",
            )
            for fid, port in zip(fleet_ids, ports, strict=True)
        ]
        return [master, *workers]

    def _verdict(self, path: Path, root: Path) -> Verdict:
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError):
            log = (root / "locust-master.log").read_text(errors="replace").splitlines()
            raise RuntimeError(
                "the Locust master wrote no verdict:\n" + "\n".join(log[-20:])
            ) from None
        fields.pop("ok", None)
        verdict = Verdict(**fields)
        if self.tms is not None:
            verdict.tms = self.tms.ups_counts()
            left = verdict.tms.get("in_progress", 0)
            if left:
                verdict.problems.append(f"{left} UPS left IN PROGRESS at the TMS")
        return verdict


def _popen(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
