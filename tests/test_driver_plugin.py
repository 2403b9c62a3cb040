"""A third-party driver, installed as a package would be, found by its entry point and
driving a whole `tdw-emu run` (docs/drivers.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from emulator.store import ObjectStore
from tests.conftest import REPO, free_port
from tests.kill_harness import run_command, start_site

PLUGIN = REPO / "tests" / "plugins" / "tdw_example_driver"


def test_an_installed_driver_plugin_is_listed_and_drives_a_run(tmp_path):
    target = tmp_path / "site-packages"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(PLUGIN)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    helped = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "run", "--help"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert helped.returncode == 0
    assert "examplelinac" in helped.stdout and "sim" in helped.stdout

    port = free_port()
    site = start_site(tmp_path / "site", port, 1)
    try:
        run = run_command(site, port, tmp_path / "device", "--device", "examplelinac:SN-42")
        run[run.index("--kind") + 1] = "pds"
        result = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    finally:
        site.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    archive = ObjectStore(tmp_path / "site" / "archive")
    try:
        (record,) = [archive.read(i) for i in archive.select("modality = 'RTRECORD'")]
    finally:
        archive.close()
    # The record names the machine as the driver identified it, not the emulator.
    assert (record.Manufacturer, record.DeviceSerialNumber) == ("Example Medical", "SN-42")
    assert record.TreatmentMachineSequence[0].ManufacturerModelName == "ExampleLinac XL"
