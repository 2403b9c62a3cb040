"""A bench rig in one process: the controller simulator on a real pty or TCP socket with
its control channel, and a reference site (TMS and Archive on 127.0.0.1) with one
performing device driving it. The HIL tests share it."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from emulator.cli_process import CliProcess
from emulator.net.peers import Peer
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from hil.controller_sim import ControllerSim
from hil.faults import ControlChannel, Faults
from tests.conftest import free_port, require_tool, start_cli_process

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)


def start_controller(
    kind: str,
    time_scale: float = 0.0,
    machine: str = "linac",
    quirks: Iterable[str] = (),
) -> tuple[str, ControllerSim, tuple[str, int]]:
    """A controller simulator in a daemon thread; returns (device spec, sim, control addr).

    The control channel also takes the host's ``place_patient``: a spec given
    ``?control=HOST:PORT`` has the simulator image the patient being treated.
    """
    faults = Faults()
    sim = ControllerSim(machine, time_scale, faults, frozenset(quirks))
    control = ControlChannel(faults, commands={"place_patient": sim.place_patient})
    if kind == "tcp":
        ready = threading.Event()
        threading.Thread(target=sim.serve_tcp, kwargs={"ready": ready}, daemon=True).start()
        ready.wait(5)
        spec = f"tcp://{sim.address[0]}:{sim.address[1]}"
    else:
        master, path = sim.open_pty()
        threading.Thread(target=sim.serve_pty, args=(master,), daemon=True).start()
        spec = f"serial://{path}"
    return spec, sim, control.address


def with_control(spec: str, control: tuple[str, int]) -> str:
    """The device URL that also names the simulator's control channel."""
    joiner = "&" if "?" in spec else "?"
    return f"{spec}{joiner}control={control[0]}:{control[1]}"


class Bench:
    """Reference sites with one scheduled session each, and the devices made for them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[ReferenceSite, PerformingDevice]] = []

    def __call__(
        self,
        device_spec: str | Callable[[ReferenceSite], str],
        kind: str = "tdd",
        seed_options: SeedOptions = SMALL,
    ) -> tuple[ReferenceSite, PerformingDevice]:
        """``device_spec`` may be a function of the seeded site (a controller that must be
        given the patient's CT before the device connects to it)."""
        ae_title = kind.upper() + "1"
        port = free_port()
        n = len(self.started)
        site = ReferenceSite(
            SiteConfig(
                data_dir=self.tmp_path / f"site{n}",
                tms_port=0,
                archive_port=0,
                seed_options=seed_options,
                peers=[Peer(ae_title, "127.0.0.1", port)],
            )
        )
        site.start()
        site.seed("LINAC1", 1)
        if callable(device_spec):
            device_spec = device_spec(site)
        device = PerformingDevice(
            DeviceConfig(
                kind,
                "LINAC1",
                ae_title,
                Peer("TMS", *site.tms.address),
                Peer("ARCHIVE", *site.archive.address),
                self.tmp_path / f"dev{n}",
                listen_port=port,
                device=device_spec,
            )
        )
        device.start()
        self.started.append((site, device))
        return site, device

    def stop(self) -> None:
        for site, device in self.started:
            device.stop()
            site.stop()


def socat_pair(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A pty pair made by socat, as a bench wires a controller: (socat, host end,
    controller end)."""
    socat = require_tool("/usr/bin/socat")
    host_end, controller_end = tmp_path / "host-tty", tmp_path / "controller-tty"
    process = subprocess.Popen(
        [
            socat, "-d", "-d",
            f"pty,raw,echo=0,link={host_end}", f"pty,raw,echo=0,link={controller_end}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (host_end.exists() and controller_end.exists()):
        assert time.monotonic() < deadline, "socat made no pty pair"
        time.sleep(0.05)
    return process, host_end, controller_end


def controller_process(*args: str, host_end: Path | None = None) -> tuple[CliProcess, str]:
    """`tdw-emu hil controller-sim ARGS` in its own process: (process, the device URL a
    host drives it by, naming its control channel so it images the patient treated). On a
    socat pair (``--serial`` the controller end) the URL is the ``host_end``."""
    sim = start_cli_process("hil controller-sim", *args, ready="controller listening on")
    listening = next(line for line in sim.output if "controller listening on" in line)
    control = next(line for line in sim.output if "control channel on" in line)
    host, port = control.rsplit(" ", 1)[1].rsplit(":", 1)
    url = f"serial://{host_end}" if host_end else listening.rsplit(" ", 1)[1]
    return sim, with_control(url, (host, int(port)))
