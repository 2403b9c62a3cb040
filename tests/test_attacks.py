"""Attacks a hostile or broken peer can make without credentials, against real `tdw-emu
tms` (TMS and its Archive) and `tdw-emu archive` processes, with and without TLS:

- one silent connection (under TLS: a ClientHello that never comes);
- forty idle TCP connections, reopened as soon as they close;
- forty connections that connect and close at once, a burst every second.

During each attack a legitimate caller's association latency (A-ASSOCIATE, C-ECHO,
A-RELEASE) stays under 1 s at p99, a legitimate PDS session completes, and every result
it stored is in the Archive. The latencies, with and without each attack, are printed and
written to attack-latency.json (`pytest -s tests/test_attacks.py` shows the table).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time

import pytest

from emulator.net import scu
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.tls import TlsConfig
from emulator.reference.ups_store import UpsStore
from emulator.store import ObjectStore
from tests.conftest import REPO, free_port, start_cli_process
from tests.kill_harness import named_results, run_command, start_site
from tests.test_tls import pki  # noqa: F401  (the module-scoped test CA fixture)

ATTACKS = ("silent", "idle-40", "churn-40")
SAMPLES = 30


class Attack:
    """Runs one attack on (host, port) in background threads until stopped."""

    def __init__(self, kind: str, address: tuple[str, int]) -> None:
        self.kind, self.address = kind, address
        self.stop = threading.Event()
        self.opened = 0
        count = 1 if kind == "silent" else 40
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def __enter__(self) -> Attack:
        for thread in self.threads:
            thread.start()
        time.sleep(0.5)  # the attack is in place before anyone measures
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            self.opened += 1
            try:
                if self.kind == "churn-40":
                    self.stop.wait(1.0)  # connect, close at once (finally), a burst a second
                    continue
                sock.settimeout(0.2)
                while not self.stop.is_set():  # send nothing; reopen once closed
                    try:
                        if sock.recv(1) == b"":
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break
            finally:
                sock.close()


def _latencies(calling: str, peer: Peer, settings: NetworkSettings) -> list[float]:
    times = []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        scu.echo(calling, peer, settings)
        times.append(time.perf_counter() - started)
    return times


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_no_peer_can_stall_the_tms_or_the_archive(tmp_path, pki, secure):  # noqa: F811
    device_port = free_port()
    tls_flags: list[str] = []
    settings = NetworkSettings()
    if secure:
        tls_flags = [
            "--tls-cert", str(pki / "site.pem"), "--tls-key", str(pki / "site.key"),
            "--tls-ca", str(pki / "ca.pem"),
        ]  # fmt: skip
        settings = NetworkSettings(
            tls=TlsConfig(pki / "device.pem", pki / "device.key", pki / "ca.pem")
        )
    # One session per attack, each on its own station (a run performs all it finds).
    stations = [f"LINAC{i}" for i in range(1, len(ATTACKS) + 1)]
    site = start_site(
        tmp_path / "site", device_port, 0, *tls_flags,
        *(a for station in stations for a in ("--seed", station)),
        "--association-request-timeout", "2", "--tls-handshake-timeout", "2",
    )  # fmt: skip
    # And the stand-alone reference Archive, `tdw-emu archive`, in a process of its own.
    standalone = start_cli_process(
        "archive", "--data-dir", str(tmp_path / "archive"), "--port", "0",
        "--ae-title", "STORE", "--allow", "PDS1", *tls_flags,
        "--association-request-timeout", "2", "--tls-handshake-timeout", "2",
    )  # fmt: skip
    tms = Peer("TMS", *site.addresses["TMS"])
    archive = Peer("ARCHIVE", *site.addresses["ARCHIVE"])
    store = Peer("STORE", standalone.host, standalone.port)
    targets = (tms, archive, store)
    figures: dict[str, dict[str, float]] = {}
    try:
        for target in targets:
            base = _latencies("PDS1", target, settings)
            figures[f"{target.ae_title} no attack"] = _summary(base)
        for index, kind in enumerate(ATTACKS):
            with contextlib.ExitStack() as attacks:
                for target in targets:
                    attacks.enter_context(Attack(kind, (target.host, target.port)))
                for target in targets:
                    times = _latencies("PDS1", target, settings)
                    figures[f"{target.ae_title} {kind}"] = _summary(times)
                    assert _percentile(times, 0.99) < 1.0, (kind, target.ae_title, figures)
                report_dir = tmp_path / f"run-{index}"
                extra = [
                    "--tls-cert", str(pki / "device.pem"), "--tls-key", str(pki / "device.key"),
                    "--tls-ca", str(pki / "ca.pem"),
                ] if secure else []  # fmt: skip
                command = run_command(
                    site, device_port, tmp_path / "device", "--report-dir", str(report_dir),
                    *extra,
                )  # fmt: skip
                command[command.index("--station") + 1] = stations[index]
                run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
                assert run.returncode == 0, (kind, run.stdout[-2000:], run.stderr[-2000:])
    finally:
        site.stop()
        standalone.stop()
    print(f"\nassociation latency, {'TLS' if secure else 'plain'}, {SAMPLES} C-ECHO each (ms)")
    for name, row in figures.items():
        print(f"  {name:<22} p50 {row['p50']:7.1f}  p99 {row['p99']:7.1f}")
    (tmp_path / "attack-latency.json").write_text(json.dumps(figures, indent=2))
    # Nothing acknowledged was lost: every UPS of the three sessions is COMPLETED, and every
    # result a UPS names is in the Archive.
    ups = UpsStore(tmp_path / "site" / "tms" / "ups.sqlite3")
    archive_store = ObjectStore(tmp_path / "site" / "archive")
    try:
        records = ups.select()
        assert [r.state for r in records] == ["COMPLETED"] * 4 * len(ATTACKS)
        for uid in named_results(records):
            assert archive_store.get(uid) is not None, uid
    finally:
        ups.close()
        archive_store.close()


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "p50": round(_percentile(times, 0.5) * 1000, 2),
        "p99": round(_percentile(times, 0.99) * 1000, 2),
    }
