"""A simulated 6-DOF positioning couch with an imager: what a PPS drives.

It moves within its translation and rotation limits at its axis speeds, and images the
phantom where it now lies, so a registration after the move measures what is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from devices.base import (
    BeamProgram,
    Capabilities,
    DeliveryEvent,
    DeviceError,
    Identity,
    Imager,
    Positioner,
)
from devices.clock import Clock
from devices.sim.linac import SimulatedLinac


class SimulatedCouch(SimulatedLinac):
    """Shares the linac's couch and imaging model; it has no beam."""

    def __init__(self, profile: dict[str, Any], clock: Clock) -> None:
        super().__init__(profile, clock)

    def roles(self) -> frozenset[type]:
        return frozenset({Positioner, Imager})

    def identify(self) -> Identity:
        i = self.profile["identity"]
        return Identity(i["vendor"], i["model"], i["serial"], str(i["firmware"]))

    def capabilities(self) -> Capabilities:
        axes = self.profile["axes"]
        return Capabilities(
            (),
            0.0,
            0.0,
            0,
            0,
            (),
            0.0,
            float(axes["couch_speed_mm_s"]),
            float(axes["couch_limits_mm"]),
            float(axes["rotation_limits_deg"]),
        )

    def load_beam(self, beam: BeamProgram) -> None:
        raise DeviceError("a positioning couch delivers no beams")

    def beam_on(self) -> Iterator[DeliveryEvent]:
        raise DeviceError("a positioning couch delivers no beams")
