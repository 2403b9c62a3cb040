"""The reference TMS and Archive as a ``tdw-emu tms`` child process, set up for a soak.

A multi-process soak (emulator/soak/processes.py) and a Locust soak
(emulator/soak/locust_launcher.py) both run the site in a process of its own, so the
devices' processes do not share its interpreter: it feeds every station of the fleet as it
queries, for the run's duration, and knows where each device (or each machine's shared
receiver, by AE title pattern) receives. When it has stopped, its UPS table says whether a
UPS was left IN PROGRESS.
"""

from __future__ import annotations

from pathlib import Path

from emulator.cli_process import CliProcess, printed_metrics_urls, start_cli
from emulator.config import tls_file_flags
from emulator.net.peers import Peer
from emulator.reference.ups_store import UpsStore
from emulator.soak.runner import SoakConfig


class ReferenceTmsProcess:
    """``start(peers)`` runs it; ``stop()`` ends it; ``ups_counts()`` reads what it left."""

    def __init__(
        self,
        config: SoakConfig,
        root: Path,
        network_values: dict,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        self.config = config
        self.root = root
        self.network_values = network_values
        self.metrics = metrics
        self.process: CliProcess | None = None

    def command(self, peers: list[Peer], stations: list[str]) -> list[str]:
        cfg = self.config
        limit = str(cfg.association_limit)
        command = [
            "tms",
            "--data-dir", str(self.root / "site"),
            "--port", "0",
            "--archive-port", "0",
            "--profile", cfg.edition,
            "--uids", cfg.uid_set,
            "--feed", f"{cfg.station_prefix}*",
            "--feed-for", f"{cfg.duration_s}s",
            "--seed-size", "small",
            "--max-associations", limit,
            "--max-pending-per-address", limit,
            "--max-pending-connections", limit,
        ]  # fmt: skip
        for peer in peers:
            command += ["--peer", str(peer)]
        for station in stations:
            command += ["--feed-prime", station]
        command += tls_file_flags(self.network_values)
        if self.network_values.get("tls_no_client_auth"):
            command.append("--tls-no-client-auth")
        if self.metrics is not None:
            command += ["--metrics-host", self.metrics[0], "--metrics-port", str(self.metrics[1])]
        return command

    def start(self, peers: list[Peer], stations: list[str]) -> tuple[Peer, Peer]:
        """Starts it with ``stations`` primed; returns the TMS and the Archive."""
        timeout = 120 + 3 * len(stations)
        self.process = start_cli(self.command(peers, stations), ready="ready", timeout=timeout)
        addresses = self.process.addresses
        return Peer("TMS", *addresses["TMS"]), Peer("ARCHIVE", *addresses["ARCHIVE"])

    @property
    def metrics_urls(self) -> list[str]:
        return printed_metrics_urls(self.process.output if self.process else [])

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=60)

    def ups_counts(self) -> dict[str, int]:
        """UPS by state, read from its table once it has stopped."""
        ups = UpsStore(self.root / "site" / "tms" / "ups.sqlite3")
        try:
            return ups.count_by_state()
        finally:
            ups.close()
