"""Writes and reads the instance references in UPS Input and Output Information items.

The final standard and the Supplement 96 draft the seed cites put the Retrieve AE Title in
different places. The TMS writes the shape of its UID set; devices read both, so an
emulated device works against a TMS of either generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


@dataclass(frozen=True)
class InstanceReference:
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    retrieve_ae_title: str

    def move_identifier(self) -> Dataset:
        """A Study Root C-MOVE identifier for this one instance, with the unique keys of
        every level above IMAGE (the hierarchical form every SCP supports, PS3.4 C.4.2.2.1)."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = self.study_instance_uid
        ident.SeriesInstanceUID = self.series_instance_uid
        ident.SOPInstanceUID = self.sop_instance_uid
        return ident


def reference_item(refs: list[InstanceReference], style: str) -> Dataset:
    """One Input/Output Information item for instances of one series."""
    first = refs[0]
    sops = []
    for ref in refs:
        sop = Dataset()
        sop.ReferencedSOPClassUID = ref.sop_class_uid
        sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
        sops.append(sop)
    item = Dataset()
    if style == "access_macro":
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = first.study_instance_uid
        item.SeriesInstanceUID = first.series_instance_uid
        item.ReferencedSOPSequence = Sequence(sops)
        retrieval = Dataset()
        retrieval.RetrieveAETitle = first.retrieve_ae_title
        item.DICOMRetrievalSequence = Sequence([retrieval])
    elif style == "sup96":
        series = Dataset()
        series.SeriesInstanceUID = first.series_instance_uid
        series.RetrieveAETitle = first.retrieve_ae_title
        series.ReferencedSOPSequence = Sequence(sops)
        item.StudyInstanceUID = first.study_instance_uid
        item.ReferencedSeriesSequence = Sequence([series])
    else:
        raise ValueError(f"unknown reference style {style!r}")
    return item


def references_in(items: list[Dataset] | Sequence) -> list[InstanceReference]:
    """Every instance referenced by Input/Output Information items, in either shape."""
    found: list[InstanceReference] = []
    for item in items or []:
        study = str(item.get("StudyInstanceUID", ""))
        if "ReferencedSeriesSequence" in item:
            for series in item.ReferencedSeriesSequence:
                aet = str(series.get("RetrieveAETitle", "") or "").strip()
                for sop in series.get("ReferencedSOPSequence", []):
                    found.append(
                        InstanceReference(
                            study,
                            str(series.get("SeriesInstanceUID", "")),
                            str(sop.ReferencedSOPClassUID),
                            str(sop.ReferencedSOPInstanceUID),
                            aet,
                        )
                    )
            continue
        retrieval = item.get("DICOMRetrievalSequence") or []
        aet = str(retrieval[0].get("RetrieveAETitle", "") if retrieval else "").strip()
        aet = aet or str(item.get("RetrieveAETitle", "") or "").strip()
        for sop in item.get("ReferencedSOPSequence", []):
            found.append(
                InstanceReference(
                    study,
                    str(item.get("SeriesInstanceUID", "")),
                    str(sop.ReferencedSOPClassUID),
                    str(sop.ReferencedSOPInstanceUID),
                    aet,
                )
            )
    return found
