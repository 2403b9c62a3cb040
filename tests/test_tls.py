"""DICOM TLS on every association: a CA made here, real handshakes, DCMTK as a peer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.config import ConfigError, network_settings
from emulator.net import scu
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.scu import AssociationFailed
from emulator.net.tls import TlsConfig
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.conftest import DCMTK_ENV, dcmtk, free_port, require_tool, start_cli_process

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [require_tool("/usr/bin/openssl"), *args], cwd=cwd, check=True, capture_output=True
    )


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-subj",
        f"/CN=tdw test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )


def _make_leaf(directory: Path, name: str, ca: str) -> None:
    ext = directory / "leaf.cnf"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        str(ext),
        cwd=directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A test CA with a site and a device certificate, and a rogue CA with its own leaf."""
    directory = tmp_path_factory.mktemp("pki")
    _make_ca(directory, "ca")
    _make_leaf(directory, "site", "ca")
    _make_leaf(directory, "device", "ca")
    _make_ca(directory, "rogue-ca")
    _make_leaf(directory, "rogue", "rogue-ca")
    return directory


def tls(pki: Path, name: str, ca: str = "ca") -> NetworkSettings:
    return NetworkSettings(
        tls=TlsConfig(pki / f"{name}.pem", pki / f"{name}.key", pki / f"{ca}.pem")
    )


@pytest.fixture
def tls_site(tmp_path, pki):
    device_port = free_port()
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            seed_options=SMALL,
            peers=[Peer("PDS1", "127.0.0.1", device_port)],
            allowed_callers=["OTHER"],
            network=tls(pki, "site"),
        )
    )
    with site:
        yield site, device_port


def test_a_whole_session_runs_over_tls(tls_site, pki, tmp_path):
    site, device_port = tls_site
    device = PerformingDevice(
        DeviceConfig(
            "pds",
            "LINAC1",
            "PDS1",
            Peer("TMS", *site.tms.address),
            Peer("ARCHIVE", *site.archive.address),
            tmp_path / "device",
            listen_port=device_port,
            network=tls(pki, "device"),
        )
    )
    with device:
        site.seed("LINAC1", 1)
        outcomes = device.run_once()
    # The C-MOVE sub-operations reached a receiver that only speaks TLS, so they used it.
    assert [o.state for o in outcomes] == ["COMPLETED"] * 4, [o.reason for o in outcomes]
    assert site.archive.store.select("modality = 'RTRECORD'")


def test_plain_tcp_and_a_foreign_certificate_are_refused(tls_site, pki):
    """Each refusal says its likely cause and the fix in one sentence (AssociationFailed)."""
    site, _ = tls_site
    archive = Peer("ARCHIVE", *site.archive.address)
    assert scu.echo("OTHER", archive, tls(pki, "device")) == 0x0000
    with pytest.raises(AssociationFailed, match="if it requires TLS, give --tls-cert"):
        scu.echo("OTHER", archive, NetworkSettings())
    with pytest.raises(AssociationFailed, match="trust the other's certificate"):
        scu.echo("OTHER", archive, tls(pki, "rogue", ca="ca"))
    # And the device refuses an Archive whose certificate its CA did not sign.
    with pytest.raises(AssociationFailed, match="trust the other's certificate"):
        scu.echo("OTHER", archive, tls(pki, "device", ca="rogue-ca"))
    # Nothing listening: said so, with the address.
    nowhere = Peer("ARCHIVE", "127.0.0.1", free_port())
    with pytest.raises(AssociationFailed, match=f"nothing accepts connections at {nowhere.host}"):
        scu.echo("OTHER", nowhere, NetworkSettings())


def test_a_plain_console_against_a_tls_tms_gets_one_sentence(tls_site):
    """`tdw-emu tms list` without TLS flags against a TLS-only TMS: exit 2, one line."""
    site, _ = tls_site
    host, port = site.tms.address
    result = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "tms", "list", "--tms", f"TMS@{host}:{port}",
         "--calling-ae", "OTHER"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "if it requires TLS, give --tls-cert, --tls-key and --tls-ca" in result.stderr


def test_dcmtk_echoscu_over_tls_against_the_archive_command(tmp_path, pki):
    proc = start_cli_process(
        "archive",
        "--data-dir",
        str(tmp_path / "archive"),
        "--port",
        "0",
        "--allow",
        "DCMTK",
        "--tls-cert",
        str(pki / "site.pem"),
        "--tls-key",
        str(pki / "site.key"),
        "--tls-ca",
        str(pki / "ca.pem"),
    )
    try:
        deadline = time.monotonic() + 10
        while not any(line.strip().startswith("TLS") for line in proc.output):
            assert time.monotonic() < deadline, proc.output
            time.sleep(0.05)
        banner = next(line.strip() for line in proc.output if line.strip().startswith("TLS"))
        assert banner == "TLS on (1.2 or later), client certificate required"
        echoscu = dcmtk("echoscu")
        base = [echoscu, "-aet", "DCMTK", "-aec", "ARCHIVE"]
        secure = subprocess.run(
            [
                *base,
                "+tls",
                str(pki / "device.key"),
                str(pki / "device.pem"),
                "+cf",
                str(pki / "ca.pem"),
                proc.host,
                str(proc.port),
            ],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=30,
        )
        assert secure.returncode == 0, secure.stdout + secure.stderr
        plain = subprocess.run(
            [*base, proc.host, str(proc.port)],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=30,
        )
        assert plain.returncode != 0
    finally:
        proc.stop()


def test_half_a_tls_configuration_is_an_error(pki):
    with pytest.raises(ConfigError, match="missing tls_key"):
        network_settings({"tls_cert": str(pki / "site.pem"), "tls_ca": str(pki / "ca.pem")})
    with pytest.raises(ConfigError, match="does not exist"):
        network_settings(
            {"tls_cert": "/nonexistent.pem", "tls_key": "/x.key", "tls_ca": str(pki / "ca.pem")}
        )


def test_scenarios_judge_a_tls_only_tms_with_its_own_ae_titles(tmp_path, pki):
    """As a vendor would: the TMS speaks only TLS and has non-default AE titles; the devices
    are announced at one address (what the TMS's Archive is configured with) and bind
    another; ``scenarios run`` takes the same TLS flags as ``run``."""
    devices = [Peer("TDWEMU1", "localhost", free_port()), Peer("TDWEMU2", "localhost", free_port())]
    site_tls = ["--tls-cert", str(pki / "site.pem"), "--tls-key", str(pki / "site.key")]
    device_tls = ["--tls-cert", str(pki / "device.pem"), "--tls-key", str(pki / "device.key")]
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"),
        "--port", "0",
        "--archive-port", "0",
        "--ae-title", "VENDORTMS",
        "--archive-ae-title", "VENDORPACS",
        *(arg for d in devices for arg in ("--peer", str(d))),
        "--seed-scenarios",
        *site_tls, "--tls-ca", str(pki / "ca.pem"),
        ready="ready",
        timeout=300,
    )  # fmt: skip
    report = tmp_path / "report"
    try:
        run = subprocess.run(
            [
                sys.executable, "-m", "emulator.cli", "scenarios", "run",
                "--tms", "VENDORTMS@127.0.0.1:{}".format(site.addresses["VENDORTMS"][1]),
                "--archive", "VENDORPACS@127.0.0.1:{}".format(site.addresses["VENDORPACS"][1]),
                *(arg for d in devices for arg in ("--device", str(d))),
                "--listen-host", "127.0.0.1",
                "--only", "normal-fraction",
                "--only", "pps-tdd-split",
                *device_tls, "--tls-ca", str(pki / "ca.pem"),
                "--report-dir", str(report),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
    finally:
        site.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((report / "conformance.json").read_text())
    assert data["ok"] and data["tls"] == "on"
    assert [s["name"] for s in data["scenarios"]] == ["normal-fraction", "pps-tdd-split"]
    assert all(s["ok"] for s in data["scenarios"])


def _tls_flags(pki: Path, name: str) -> list[str]:
    return [
        "--tls-cert", str(pki / f"{name}.pem"),
        "--tls-key", str(pki / f"{name}.key"),
        "--tls-ca", str(pki / "ca.pem"),
    ]  # fmt: skip


def _echo(pki: Path, port: int, *tls_args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", "PDS1", "-aec", "TMS", *tls_args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=30,
    )


def test_tms_and_run_commands_over_tls_and_a_tms_without_client_auth(tmp_path, pki):
    """`tdw-emu tms` with TLS and --tls-no-client-auth; `tdw-emu run` performs a whole
    session over TLS against it; DCMTK shows what the TMS accepts: TLS without a client
    certificate (as configured), never plain TCP."""
    device_port = free_port()
    site = start_cli_process(
        "tms",
        "--data-dir", str(tmp_path / "site"), "--port", "0", "--archive-port", "0",
        "--peer", f"PDS1@127.0.0.1:{device_port}", "--seed", "LINAC1",
        *_tls_flags(pki, "site"), "--tls-no-client-auth",
        ready="ready",
    )  # fmt: skip
    try:
        assert "  TLS on (1.2 or later), client certificate not required" in site.output
        tms_port = site.addresses["TMS"][1]
        archive_port = site.addresses["ARCHIVE"][1]
        anonymous = _echo(pki, tms_port, "+tla", "+cf", str(pki / "ca.pem"))
        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        plain = _echo(pki, tms_port)
        assert plain.returncode != 0, plain.stdout
        run = subprocess.run(
            [
                sys.executable, "-m", "emulator.cli", "run",
                "--kind", "pds", "--station", "LINAC1", "--ae-title", "PDS1",
                "--tms", f"TMS@127.0.0.1:{tms_port}",
                "--archive", f"ARCHIVE@127.0.0.1:{archive_port}",
                "--listen-port", str(device_port), "--data-dir", str(tmp_path / "device"),
                *_tls_flags(pki, "device"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        site.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("COMPLETED") == 4, run.stdout


def test_soak_over_tls_configured_in_yaml(tmp_path, pki):
    """Every association of an embedded soak (devices, TMS, Archive, C-MOVE back to the
    devices) speaks TLS with client certificates, and the run loses nothing. The TLS keys
    and a limit come from `--config` (as README and docs/metrics.md say they can)."""
    out = tmp_path / "verdict.json"
    config = tmp_path / "soak.yaml"
    config.write_text(
        "soak:\n"
        f"  tls_cert: {pki / 'site.pem'}\n"
        f"  tls_key: {pki / 'site.key'}\n"
        f"  tls_ca: {pki / 'ca.pem'}\n"
        "  max_p99_ms: 5000\n"
        "  workers: 0\n"
    )
    proc = start_cli_process(
        "soak", "--embedded", "--devices", "2", "--duration", "5s", "--json", str(out),
        "--config", str(config),
        ready="PASS", timeout=180,
    )  # fmt: skip
    proc.process.wait(timeout=60)
    assert proc.process.returncode == 0, "\n".join(proc.output)
    assert "TLS on (1.2 or later), client certificate required" in proc.output
    verdict = json.loads(out.read_text())
    assert verdict["ok"] and verdict["sessions"]["completed"] >= 2
    assert verdict["records"]["lost_records"] == 0
    assert verdict["limits"] == {"p99_ms": 5000}
    assert not any("worker processes" in line for line in proc.output)  # workers: 0


def test_a_soak_config_key_that_is_no_option_is_refused(tmp_path):
    config = tmp_path / "soak.yaml"
    config.write_text("soak:\n  tls_certificate: x.pem\n")
    result = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "soak", "--embedded", "--devices", "1",
         "--duration", "1s", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown soak option 'tls_certificate'" in result.stderr
    assert "Traceback" not in result.stderr
