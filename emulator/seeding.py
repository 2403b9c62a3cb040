"""``tdw-emu seed``: writes synthetic patients to disk from command-line style options."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from emulator.profile import SopClasses, load_sop_classes
from emulator.synth import (
    PatientContext,
    PhantomGeometry,
    PlanSpec,
    SyntheticPatient,
    generate_patient,
)
from emulator.synth.brachy import BrachySpec, SyntheticBrachyPatient, generate_brachy_patient
from emulator.synth.dose import build_dose

KINDS = ("linac", "afterloader")


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
    # linac: a photon IMRT plan; afterloader: an HDR brachytherapy plan (its own fields).
    kind: str = "linac"
    channels: int = 3
    dwells_per_channel: int = 6
    channel_time: float = 60.0


# A soak exercises the workflow and the TMS, not pixel throughput: small images keep the
# site's seeding and the devices' retrievals off the critical path.
SOAK_PATIENTS = SeedOptions(slices=8, rows=64, beams=4, dynamic_beams=2)


def synthetic_patient(
    options: SeedOptions, index: int, uids: SopClasses | None = None
) -> SyntheticPatient | SyntheticBrachyPatient:
    """Patient number ``index`` (from 1) as the options describe it."""
    uids = uids or load_sop_classes(options.uids)
    if options.kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {options.kind!r}")
    if options.kind == "afterloader":
        return synthetic_brachy_patient(options, index, uids)
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
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a directory for the patients")
    uids = load_sop_classes(options.uids)
    return [
        synthetic_patient(options, index, uids).write(Path(out_dir) / f"patient_{index:03d}")
        for index in range(1, options.patients + 1)
    ]


def synthetic_brachy_patient(
    options: SeedOptions, index: int, uids: SopClasses
) -> SyntheticBrachyPatient:
    """HDR patient number ``index``: a catheter CT of the options' size and a plan for the
    source the simulated afterloader holds today."""
    geometry = PhantomGeometry(
        rows=options.rows,
        columns=options.rows,
        pixel_spacing=options.pixel_spacing,
        slices=options.slices,
        slice_spacing=options.slice_spacing,
    )
    spec = BrachySpec(
        channels=options.channels,
        dwells_per_channel=options.dwells_per_channel,
        channel_time_s=options.channel_time,
        fractions=options.fractions,
        dose_per_fraction_gy=options.dose_per_fraction,
    )
    context = PatientContext(
        patient_name=f"TDW^Brachy{index:03d}",
        patient_id=f"{options.patient_id_prefix}B{index:04d}",
        accession_number=f"{options.patient_id_prefix}B{index:04d}A",
    )
    return generate_brachy_patient(context, spec, uids=uids, geometry=geometry)


# A brachytherapy seed in a site that also treats with linacs: 4 fractions of 7 Gy, small
# images (the catheters need no fine CT here), 3 channels of 6 dwells.
AFTERLOADER_PATIENTS = SeedOptions(
    kind="afterloader", slices=16, rows=64, pixel_spacing=5.0, fractions=4, dose_per_fraction=7.0
)
# The small one: 2 channels of 3 dwells, 3 reference seconds a channel, so a session at
# time scale 1 lasts under a minute (checks, transfers and all).
AFTERLOADER_SMALL = replace(
    AFTERLOADER_PATIENTS, slices=8, rows=32, pixel_spacing=8.0, channels=2,
    dwells_per_channel=3, channel_time=3.0,
)  # fmt: skip
