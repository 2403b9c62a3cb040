"""Device kinds as compositions of steps: what a PPS, a PDS, a TDD and an afterloader
perform of a session (IHE-RO TDW's performing devices, and the afterloader the seed's
delivery workflow asks the same framework for). A new kind is a new tuple here."""

from __future__ import annotations

from emulator.performer.steps.base import Step
from emulator.performer.steps.beam_delivery import BeamDeliveryStep
from emulator.performer.steps.dwell_delivery import DwellDeliveryStep
from emulator.performer.steps.positioning import AcquisitionStep, AdjustmentStep, RegistrationStep

POSITIONING: tuple[type[Step], ...] = (AcquisitionStep, RegistrationStep, AdjustmentStep)

KINDS: dict[str, tuple[type[Step], ...]] = {  # the keys are actors.KINDS
    "pps": POSITIONING,
    "tdd": (BeamDeliveryStep,),
    "pds": (*POSITIONING, BeamDeliveryStep),
    "afterloader": (DwellDeliveryStep,),
}


# The machine a kind drives when none is named (``--device``): its simulated one.
SIMULATED_MACHINES: dict[str, str] = {"afterloader": "sim:afterloader"}


def simulated_machine(kind: str) -> str:
    """The ``--device`` a kind uses by default."""
    return SIMULATED_MACHINES.get(kind, "sim")


def steps_of(kind: str) -> tuple[type[Step], ...]:
    """The steps a device kind performs, in session order."""
    if kind not in KINDS:
        raise ValueError(f"unknown device kind {kind!r}; choose {', '.join(KINDS)}")
    return KINDS[kind]
