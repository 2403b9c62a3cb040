"""The patient and study identity a device writes into its results.

Results go into the Study Instance UID the UPS supplied (RO-22..24). When an input object
(planning CT, plan) belongs to that study, its study attributes are copied unchanged, as
Appendix A requires of anything that joins an existing study; otherwise the type 2 study
attributes stay empty rather than being invented.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from emulator.synth import PatientContext


def result_identity(ups: Dataset, inputs: list[Dataset]) -> PatientContext:
    """Identity for a result of ``ups``: patient from the UPS, study from a same-study input."""
    same_study = next(
        (ds for ds in inputs if str(ds.get("StudyInstanceUID", "")) == str(ups.StudyInstanceUID)),
        None,
    )
    source = same_study if same_study is not None else ups
    ctx = PatientContext.from_dataset(source)
    ctx.patient_name = str(ups.get("PatientName", ""))
    ctx.patient_id = str(ups.get("PatientID", ""))
    ctx.birth_date = str(ups.get("PatientBirthDate", ctx.birth_date) or "")
    ctx.sex = str(ups.get("PatientSex", ctx.sex) or "")
    ctx.study_instance_uid = str(ups.StudyInstanceUID)
    if same_study is None:
        ctx.study_date = ctx.study_time = ""
        ctx.study_id = ctx.accession_number = ctx.study_description = ""
        ctx.referring_physician = ""
    return ctx
