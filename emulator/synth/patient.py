"""One synthetic patient, end to end: CT, structures, plan, dose and delivery instruction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from emulator.profile import DEFAULT_UID_SET, SopClasses, load_sop_classes
from emulator.synth.common import PatientContext
from emulator.synth.ct import build_ct_series
from emulator.synth.delivery_instruction import build_delivery_instruction
from emulator.synth.dose import build_dose
from emulator.synth.phantom import PhantomGeometry
from emulator.synth.plan import PlanSpec, build_plan
from emulator.synth.structures import build_structure_set


@dataclass
class SyntheticPatient:
    """The objects of one patient, all sharing patient, study and frame of reference."""

    context: PatientContext
    ct: list[Dataset]
    structure_set: Dataset
    plan: Dataset
    dose: Dataset
    delivery_instruction: Dataset
    planning_objects: list[Dataset] = field(init=False)

    def __post_init__(self) -> None:
        self.planning_objects = [*self.ct, self.structure_set, self.plan, self.dose]

    def all_objects(self) -> list[Dataset]:
        """Archive objects first, then the TMS-side delivery instruction."""
        return [*self.planning_objects, self.delivery_instruction]

    def write(self, out_dir: Path) -> list[Path]:
        """Writes every object as a DICOM Part 10 file; names come from our own counters."""
        return write_patient_files(
            out_dir,
            self.ct,
            (
                ("RTSTRUCT", self.structure_set),
                ("RTPLAN", self.plan),
                ("RTDOSE", self.dose),
                ("RTBDI", self.delivery_instruction),
            ),
        )


def write_patient_files(
    out_dir: Path, ct: list[Dataset], named: tuple[tuple[str, Dataset], ...]
) -> list[Path]:
    """CT_0001.dcm ... and NAME.dcm for each other object: names from our own counters,
    never from a peer's data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(ct, start=1):
        paths.append(out_dir / f"CT_{index:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    for name, ds in named:
        paths.append(out_dir / f"{name}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def generate_patient(
    context: PatientContext | None = None,
    geometry: PhantomGeometry | None = None,
    plan_spec: PlanSpec | None = None,
    uids: SopClasses | None = None,
    fraction_number: int = 1,
) -> SyntheticPatient:
    """Builds a consistent patient; every argument has a realistic default."""
    context = context or PatientContext()
    geometry = geometry or PhantomGeometry()
    plan_spec = plan_spec or PlanSpec()
    uids = uids or load_sop_classes(DEFAULT_UID_SET)
    ct = build_ct_series(context, geometry, uids)
    structure_set = build_structure_set(context, geometry, ct, uids)
    plan = build_plan(context, geometry, structure_set, plan_spec, uids)
    dose = build_dose(context, geometry, plan, uids)
    instruction = build_delivery_instruction(context, plan, uids, fraction_number)
    return SyntheticPatient(context, ct, structure_set, plan, dose, instruction)
