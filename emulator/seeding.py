"""``tdw-emu seed``: writes synthetic patients to disk from command-line style options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emulator.profile import SopClasses, load_sop_classes
from emulator.synth import (
    PatientContext,
    PhantomGeometry,
    PlanSpec,
    SyntheticPatient,
    generate_patient,
)
from emulator.synth.dose import build_dose


@dataclass(frozen=True)
class SeedOptions:
    patients: int = 1
    slices: int = 40
    slice_spacing: float = 2.5
    rows: int = 128
    pixel_spacing: float = 3.0
    beams: int = 4
    dynamic_beams: int = 2
    control_points: int = 20
    fractions: int = 30
    dose_per_fraction: float = 2.0
    dose_bits: int = 16
    uids: str = "final"
    patient_id_prefix: str = "TDW"


# A soak exercises the workflow and the TMS, not pixel throughput: small images keep the
# site's seeding and the devices' retrievals off the critical path.
SOAK_PATIENTS = SeedOptions(slices=8, rows=64, beams=4, dynamic_beams=2)


def synthetic_patient(
    options: SeedOptions, index: int, uids: SopClasses | None = None
) -> SyntheticPatient:
    """Patient number ``index`` (from 1) as the options describe it."""
    uids = uids or load_sop_classes(options.uids)
    geometry = PhantomGeometry(
        rows=options.rows,
        columns=options.rows,
        pixel_spacing=options.pixel_spacing,
        slices=options.slices,
        slice_spacing=options.slice_spacing,
    )
    spec = PlanSpec(
        beams=options.beams,
        dynamic_beams=options.dynamic_beams,
        control_points=options.control_points,
        fractions=options.fractions,
        dose_per_fraction_gy=options.dose_per_fraction,
    )
    context = PatientContext(
        patient_name=f"TDW^Phantom{index:03d}",
        patient_id=f"{options.patient_id_prefix}{index:04d}",
        accession_number=f"{options.patient_id_prefix}{index:04d}A",
    )
    patient = generate_patient(context, geometry, spec, uids)
    if options.dose_bits != 16:
        patient.dose = build_dose(context, geometry, patient.plan, uids, options.dose_bits)
        patient.planning_objects[-1] = patient.dose
    return patient


def seed_patients(out_dir: Path, options: SeedOptions) -> list[list[Path]]:
    """One sub-directory per patient (``patient_001`` ...), names chosen by us."""
    uids = load_sop_classes(options.uids)
    return [
        synthetic_patient(options, index, uids).write(Path(out_dir) / f"patient_{index:03d}")
        for index in range(1, options.patients + 1)
    ]
