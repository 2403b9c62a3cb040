"""Shared identity for one synthetic patient, and the modules every object repeats.

Appendix A of the seed requires Patient, Study and Frame of Reference attributes to be
*copied* from the CT (the source) into every RT object. Holding them once here, and
building every object from the same :class:`PatientContext`, makes those copy rules
true by construction instead of by later patching.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from emulator import __version__

MANUFACTURER = "tdw-emulator"
MODEL_NAME = "tdw-emulator synthetic planning"
IMPLEMENTATION_VERSION = f"TDWEMU_{__version__}".replace(".", "")[:16]


# General Study attributes besides the Study Instance UID (Appendix A: copied, never altered).
STUDY_ATTRIBUTES = (
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
)


def new_uid() -> str:
    """A fresh UID under pydicom's documented generation root."""
    return str(generate_uid())


def da(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d")


def tm(moment: dt.datetime) -> str:
    return moment.strftime("%H%M%S")


@dataclass
class PatientContext:
    """Identity shared by all objects of one synthetic patient (Appendix A source values)."""

    patient_name: str = "TDW^Phantom"
    patient_id: str = "TDW0001"
    birth_date: str = "19600101"
    sex: str = "O"
    study_instance_uid: str = field(default_factory=new_uid)
    study_id: str = "1"
    accession_number: str = "TDW0001A"
    study_description: str = "Synthetic RT planning study"
    referring_physician: str = "Referrer^Synthetic"
    frame_of_reference_uid: str = field(default_factory=new_uid)
    position_reference_indicator: str = ""
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now().replace(microsecond=0))
    # Set when the identity is copied from an existing object: its exact study date/time.
    study_date: str = ""
    study_time: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PatientContext:
        """The identity an existing object carries, so new objects copy it (Appendix A)."""
        return cls(
            patient_name=str(ds.get("PatientName", "")),
            patient_id=str(ds.get("PatientID", "")),
            birth_date=str(ds.get("PatientBirthDate", "")),
            sex=str(ds.get("PatientSex", "")),
            study_instance_uid=str(ds.StudyInstanceUID),
            study_id=str(ds.get("StudyID", "")),
            accession_number=str(ds.get("AccessionNumber", "")),
            study_description=str(ds.get("StudyDescription", "")),
            referring_physician=str(ds.get("ReferringPhysicianName", "")),
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or new_uid(),
            position_reference_indicator=str(ds.get("PositionReferenceIndicator", "")),
            study_date=str(ds.get("StudyDate", "")),
            study_time=str(ds.get("StudyTime", "")),
        )

    def apply_patient_study(self, ds: Dataset) -> None:
        """Patient and General Study modules, copied unchanged into every object."""
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = self.birth_date
        ds.PatientSex = self.sex
        ds.StudyInstanceUID = self.study_instance_uid
        ds.StudyDate = self.study_date or da(self.created)
        ds.StudyTime = self.study_time or tm(self.created)
        ds.ReferringPhysicianName = self.referring_physician
        ds.StudyID = self.study_id
        ds.AccessionNumber = self.accession_number
        ds.StudyDescription = self.study_description

    def apply_frame_of_reference(self, ds: Dataset) -> None:
        """Frame of Reference module: one frame for CT, structures, plan and dose."""
        ds.FrameOfReferenceUID = self.frame_of_reference_uid
        ds.PositionReferenceIndicator = self.position_reference_indicator


def new_dataset(sop_class_uid: str, sop_instance_uid: str | None = None) -> Dataset:
    """A dataset with file meta and SOP Common filled in, ready for the IOD's own modules."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    now = dt.datetime.now()
    ds.InstanceCreationDate = da(now)
    ds.InstanceCreationTime = tm(now)
    return ds


def apply_series(
    ds: Dataset,
    ctx: PatientContext,
    modality: str,
    series_uid: str,
    series_number: int,
    description: str,
) -> None:
    """General/RT Series module; Appendix A asks for number, date, time and description."""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = da(ctx.created)
    ds.SeriesTime = tm(ctx.created)
    ds.SeriesDescription = description
    ds.OperatorsName = ""


def apply_equipment(ds: Dataset, model: str = MODEL_NAME, station: str = "TDWSYNTH") -> None:
    """General Equipment module; Appendix A requires Manufacturer and Model Name."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model
    ds.StationName = station
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = "SYN-0001"


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def sop_reference(ds: Dataset) -> Dataset:
    """A Referenced SOP Class UID / Referenced SOP Instance UID item pointing at ``ds``."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def sequence(*items: Dataset) -> Sequence:
    return Sequence(list(items))
