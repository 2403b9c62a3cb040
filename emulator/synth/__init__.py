"""Synthetic RT patient data that follows the seed's Appendix A copy and constraint rules."""

from emulator.synth.common import PatientContext
from emulator.synth.delivery_instruction import ContinuationRange, build_delivery_instruction
from emulator.synth.patient import SyntheticPatient, generate_patient
from emulator.synth.phantom import PhantomGeometry
from emulator.synth.plan import PlanSpec

__all__ = [
    "ContinuationRange",
    "PatientContext",
    "PhantomGeometry",
    "PlanSpec",
    "SyntheticPatient",
    "build_delivery_instruction",
    "generate_patient",
]
