"""An example driver plugin for tdw-emulator (docs/drivers.md).

A real driver talks to its machine's own control interface; this one wraps the project's
simulated linac so the example runs anywhere, and shows the three things every driver
provides: a factory registered under the ``tdw_emulator.devices`` entry-point group, a
:class:`devices.base.Machine` subclass with the roles the machine has (the simulated
linac is a ``BeamDeliverer``, ``Positioner`` and ``Imager``, so a PDS session runs on it),
and the machine's own identity and capabilities.
"""

from __future__ import annotations

from dataclasses import replace

from devices.base import Capabilities, Identity, Machine
from devices.clock import Clock
from devices.sim.linac import SimulatedLinac, load_machine_profile


class ExampleLinac(SimulatedLinac):
    """A vendor's linac: the simulated machine under the vendor's name and limits."""

    def __init__(self, serial: str, clock: Clock, options: dict) -> None:
        super().__init__(load_machine_profile("linac"), clock, options.get("interlocks"))
        self.serial = serial or "EX-0001"

    def identify(self) -> Identity:
        return Identity("Example Medical", "ExampleLinac XL", self.serial, "7.1.2")

    def capabilities(self) -> Capabilities:
        return replace(super().capabilities(), energies_mv=(6.0, 10.0, 15.0, 18.0))


def make_device(rest: str, clock: Clock, options: dict) -> Machine:
    """``examplelinac:SERIAL``. ``rest`` is what follows the backend name, ``clock`` the
    device time of the run (scaled by --time-scale), ``options`` the run's extras
    (``interlocks``, ``link_observer``, ``timing``)."""
    return ExampleLinac(rest.strip("/"), clock, options)
