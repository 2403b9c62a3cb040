"""Drives a delivery UPS the way a device would, to test what the TMS does afterwards."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from emulator.net import scu
from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.profile import load_sop_classes
from emulator.reference.site import ReferenceSite
from emulator.results.treatment_record import build_treatment_record, delivered_as_planned
from emulator.ups_references import InstanceReference, references_in
from tests.ups_client import UpsClient, cancellation, final_update, progress


@dataclass
class PartialDelivery:
    site: ReferenceSite
    receiver: StorageReceiver
    specified: dict[int, float]
    record: Dataset

    def fetch_from_tms(self, ref: InstanceReference) -> Dataset:
        """RO-20: C-MOVE from the AE the reference names, into the device's receiver."""
        assert ref.retrieve_ae_title == "TMS"
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.SOPInstanceUID = ref.sop_instance_uid
        result = scu.move("DEVICE", Peer("TMS", *self.site.tms.address), ident, "DEVICE")
        assert result.completed == 1
        return self.receiver.store.read(self.receiver.store.get(ref.sop_instance_uid))


def output_item(record: Dataset, archive_ae: str) -> Dataset:
    """An Output Information item in the seed's Table 3.21-1 shape."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = record.SOPClassUID
    sop.ReferencedSOPInstanceUID = record.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = record.SeriesInstanceUID
    series.RetrieveAETitle = archive_ae
    series.ReferencedSOPSequence = Sequence([sop])
    item = Dataset()
    item.StudyInstanceUID = record.StudyInstanceUID
    item.ReferencedSeriesSequence = Sequence([series])
    return item


def deliver_partially_and_cancel(
    site: ReferenceSite, receiver: StorageReceiver, fractions_delivered: dict[int, float]
) -> PartialDelivery:
    uids = load_sop_classes()
    host, port = site.tms.address
    with UpsClient(host, port, "TMS", "DEVICE") as tms:
        delivery = next(
            u
            for u in tms.worklist("LINAC1")
            if u.ScheduledWorkitemCodeSequence[0].CodeValue == "121726"
        )
        plan_ref = next(
            r
            for r in references_in(delivery.InputInformationSequence)
            if r.sop_class_uid == uids["rt_plan"]
        )
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.SOPInstanceUID = plan_ref.sop_instance_uid
        archive = Peer(plan_ref.retrieve_ae_title, *site.archive.address)
        scu.move("DEVICE", archive, ident, "DEVICE")
        plan = receiver.store.read(receiver.store.get(plan_ref.sop_instance_uid))
        transaction = str(generate_uid())
        assert tms.change_state(delivery.SOPInstanceUID, "IN PROGRESS", transaction)[0] == 0
        assert tms.n_set(delivery.SOPInstanceUID, progress(transaction, 0, beam=1)) == 0
        beams = [delivered_as_planned(plan, n, f) for n, f in fractions_delivered.items()]
        record = build_treatment_record(
            plan, beams, uids, delivery.StudyInstanceUID, "LINAC1", 1, dt.datetime.now()
        )
        scu.store("DEVICE", archive, [record])
        specified = {
            int(r.ReferencedBeamNumber): float(r.BeamMeterset)
            for r in plan.FractionGroupSequence[0].ReferencedBeamSequence
        }
        done = sum(b.delivered for b in beams) / sum(specified.values()) * 100
        assert tms.n_set(delivery.SOPInstanceUID, progress(transaction, round(done, 1))) == 0
        reason = "MLC interlock on beam 2"
        assert tms.n_set(delivery.SOPInstanceUID, cancellation(transaction, done, reason)) == 0
        update = final_update(
            transaction,
            delivery.ScheduledWorkitemCodeSequence[0],
            "LINAC1",
            [output_item(record, archive.ae_title)],
        )
        assert tms.n_set(delivery.SOPInstanceUID, update) == 0
        status, reply = tms.change_state(
            delivery.SOPInstanceUID,
            "CANCELED",
            transaction,
            ReasonForCancellation="MLC interlock on beam 2",
        )
        assert status == 0
        assert (
            0 < float(reply.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) < 100
        )
    return PartialDelivery(site, receiver, specified, record)
