"""The positioning steps of a session (RO-17 3.17.4.2, responses 1 to 3): acquire a CBCT
of the patient, register it against the planning CT, move the couch by what the
registration found and verify the couch got there."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from devices.base import CouchCorrection, Imager, Positioner
from devices.couch_axes import TableTop, misses, to_table_top
from emulator.performer import actors
from emulator.performer.steps.base import Cancel, Step, Work
from emulator.performer.steps.session_state import SessionState, patient_position
from emulator.results.acquisition import build_cbct_series
from emulator.results.registration import build_registration
from emulator.results.rigid_registration import (
    RegistrationError,
    planning_volume,
    register_series,
    volume_from_images,
)
from emulator.results.study_identity import result_identity
from emulator.ups_references import InstanceReference

LOG = logging.getLogger("tdw.device")


def _save_session(work: Work, journal) -> None:
    journal.session_saved(actors.session_label(work.claim.ups), work.session.journal_state())


class AcquisitionStep(Step):
    """RO-22: a CBCT of the patient on the couch, stored in the Archive."""

    name = "acquisition"
    role = Imager

    def input_problems(self, ups: Dataset, refs: list[InstanceReference]) -> list[str]:
        """A CBCT is compared with one planning CT series, when the TMS names one."""
        ct = self.context.uids["ct_image"]
        series = {r.series_instance_uid for r in refs if r.sop_class_uid == ct}
        if refs and len(series) != 1:
            return ["RO-17/Response-1: a CT acquisition needs one CT series input"]
        return []

    def perform(self, work: Work) -> float:
        context, claim, session = self.context, work.claim, work.session
        session.planning_ct = sorted(
            (ds for ds in work.inputs.held.values() if ds.SOPClassUID == context.uids["ct_image"]),
            key=lambda ds: float(ds.ImagePositionPatient[2]),
        )
        identity = result_identity(claim.ups, session.planning_ct)
        imager = self.machine
        imager.place_patient(
            planning_volume(session.planning_ct), patient_position(session.planning_ct)
        )
        # RO-26 while the scan runs, as the machine reports its share done.
        context.machine.watch_progress(lambda _op, share: claim.reporter.offer(share * 100))
        session.cbct = build_cbct_series(
            identity, imager.acquire("CBCT"), context.uids, context.station
        )
        claim.stored = context.store_results(session.cbct, "RO-22", claim.uid, 100.0)
        _save_session(work, context.journal)
        return 100.0


class RegistrationStep(Step):
    """RO-23: where the patient lies, measured by registering the CBCT to the planning CT."""

    name = "registration"
    role = Imager  # the registration needs no motion, but the images of this machine's imager

    def perform(self, work: Work) -> float:
        context, claim, session = self.context, work.claim, work.session
        if not session.cbct or not session.planning_ct:
            raise Cancel("RO-23: no acquisition in this session to register", cause="refused_input")
        try:
            measured = register_series(
                session.planning_ct,
                volume_from_images(session.cbct),
                rotations=context.machine.capabilities().couch_rotation_limits_deg > 0,
            )
        except RegistrationError as error:
            raise Cancel(f"RO-23: {error}", cause="refused_input") from error
        identity = result_identity(claim.ups, session.planning_ct)
        registration: Dataset = build_registration(
            identity,
            session.planning_ct,
            session.cbct,
            measured.matrix,
            context.uids,
            context.station,
        )
        claim.stored = context.store_results([registration], "RO-23", claim.uid, 100.0)
        session.correction = CouchCorrection(*measured.correction)
        _save_session(work, context.journal)
        return 100.0


class AdjustmentStep(Step):
    """The couch moved by the registration's correction, and verified in all six axes."""

    name = "adjustment"
    role = Positioner

    def perform(self, work: Work) -> float:
        if work.session.correction is None:
            # Moving the couch by nothing would leave the patient where the CBCT showed
            # them to be off: no correction known, no adjustment.
            raise Cancel(
                "no registration in this session: the couch correction is unknown",
                cause="refused_input",
            )
        self.move_couch(work.session)
        return 100.0

    def move_couch(self, session: SessionState) -> TableTop:
        """The registration's correction as a table-top move, verified in all six axes
        against what the couch reports it reached (hil/PROTOCOL.md, Safety). Out of the
        machine's tolerance, the rest is asked for ``couch_retries`` times; still out, no
        beam may be turned on: the step is canceled naming the couch and the axis.
        """
        couch = self.machine
        caps = self.context.machine.capabilities()
        correction = session.correction
        asked = to_table_top(
            correction.translation, correction.rotation, patient_position(session.planning_ct)
        )
        before = couch.couch_position()
        after = couch.move_couch(asked)
        for _ in range(caps.couch_retries):
            if not misses(asked, after - before, caps.couch_tolerance_mm, caps.couch_tolerance_deg):
                break
            LOG.warning("couch short of the correction: asking for the rest")
            after = couch.move_couch(asked - (after - before))
        missed = misses(asked, after - before, caps.couch_tolerance_mm, caps.couch_tolerance_deg)
        if missed:
            self.context.metrics.fault("couch")
            raise Cancel(
                f"couch {'; '.join(missed)} (tolerance {caps.couch_tolerance_mm:g} mm, "
                f"{caps.couch_tolerance_deg:g}°): no beam may be turned on",
                cause="couch_out_of_tolerance",
            )
        return after
