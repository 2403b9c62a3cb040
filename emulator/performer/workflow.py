"""The one place where RO-17 ... RO-25 happen, in order, for each UPS a device takes.

query (RO-17) -> check inputs -> retrieve (RO-18 from the Archive, RO-20 from the TMS) ->
check what arrived and the plan -> claim (RO-19) -> progress 0 % (RO-26) -> perform ->
progress -> store results (RO-22/23/24) -> final update (RO-21) -> complete or cancel
(RO-25). A problem before the claim leaves the UPS alone; after it, the UPS is CANCELED
with the reason and the progress actually reached, and never more meterset than delivered.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from devices.base import DeviceError, Machine, role
from devices.clock import Clock
from devices.registry import open_device
from emulator import ups_attributes
from emulator.metrics import Metrics, default_metrics
from emulator.net import scu
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.net.scu import DimseError
from emulator.net.shared_receiver import ReceiverInbox, SharedStorageReceiver
from emulator.net.uid_registry import register_uid_set
from emulator.performer import actors, safety
from emulator.performer.cancel_requests import CancelRequests
from emulator.performer.claim import ClaimedUps
from emulator.performer.kinds import simulated_machine, steps_of
from emulator.performer.messages import (
    STATION_SCHEME,
    cancel_dataset,
    claim_refusal,
    final_update_dataset,
    progress_dataset,
    worklist_identifier,
)
from emulator.performer.outbox import Claim, ClaimJournal, ResultOutbox, RetryPolicy
from emulator.performer.progress import ProgressRefused, ProgressReporter
from emulator.performer.steps.base import Cancel, Step, StepContext, StepInputs, Work
from emulator.performer.steps.session_state import SessionState
from emulator.performer.tms_link import LOST_2008_CLAIM, Backoff, TmsLink, TmsUnavailable
from emulator.profile import Profile, load_profile
from emulator.store import admit
from emulator.ups_references import InstanceReference, references_in

__all__ = [  # the messages' datasets are imported from here by older callers
    "STATION_SCHEME",
    "DeviceConfig",
    "PerformingDevice",
    "UpsOutcome",
    "cancel_dataset",
    "claim_refusal",
    "final_update_dataset",
    "progress_dataset",
    "session_outcome",
    "worklist_identifier",
]

LOG = logging.getLogger("tdw.device")
# How long a device that watched a UPS listens for the TMS's State Report of the final
# state before it unsubscribes (and, at the end of a run, stops listening).
FINAL_REPORT_WAIT_S = 1.0


@dataclass
class DeviceConfig:
    kind: str
    station: str
    ae_title: str
    tms: Peer
    archive: Peer
    data_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    edition: str = "ihe-ro-2008"
    uid_set: str = "final"
    time_scale: float = 0.0
    device: str = ""  # "" is the kind's simulated machine (kinds.simulated_machine)
    interlocks: dict[int, float] = field(default_factory=dict)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    store_retry: RetryPolicy = field(default_factory=RetryPolicy)
    # How long one exchange with the TMS keeps being retried while the TMS cannot be
    # reached (a restart, a network outage) before the device gives up on it for now.
    tms_retry_window: float = 120.0
    # Subscribe to each claimed UPS (UPS Watch) so a Cancel Requested from the TMS reaches
    # the beam; off, the device neither subscribes nor hears of cancel requests.
    watch_claimed_ups: bool = True
    # A rig's overrides of the controller's timing budget (hil/PROTOCOL.md, Timing).
    device_timing: dict[str, float] = field(default_factory=dict)
    # RO-26 reports at least this often while a step runs (None: profiles/progress.yaml).
    progress_every_s: float | None = None


@dataclass
class UpsOutcome:
    """What happened to one UPS: COMPLETED, CANCELED, REFUSED (never claimed) or SKIPPED."""

    sop_instance_uid: str
    step: str
    label: str
    state: str
    reason: str = ""
    stored: list[str] = field(default_factory=list)
    delivered: dict[int, float] = field(default_factory=dict)
    delivery_type: str = ""
    session: str = ""  # the device's session key: PatientID/scheduled date
    # An earlier run decided how this claim ends (its final transition was pending); this
    # run only got the TMS to accept it.
    settled: bool = False
    # What went wrong though the step ended (a beam's meterset off its plan), in words.
    flags: list[str] = field(default_factory=list)


INTERRUPTIONS = ("MACHINE termination", "OPERATOR termination")


def session_outcome(outcomes: list[UpsOutcome]) -> str:
    """One word for a session, as ``tdw_sessions_total`` and soak verdicts count them.

    ``interrupted`` is a delivery canceled on a beam termination (a continuation follows);
    ``refused`` means nothing was claimed (inputs, safety, or another device won the claim).
    """
    states = [o.state for o in outcomes]
    if all(state == "COMPLETED" for state in states):
        return "completed"
    if "FAILED" in states:
        return "failed"
    canceled = [o for o in outcomes if o.state == "CANCELED"]
    if canceled:
        if any(o.step == "delivery" and o.reason.startswith(INTERRUPTIONS) for o in canceled):
            return "interrupted"
        return "canceled"
    return "refused"


class PerformingDevice:
    """A PPS, PDS, TDD or afterloader: a DICOM actor in front of one machine.

    It keeps the UPS lifecycle (query, retrieve, claim, progress, final update, complete or
    cancel) and journals it; what each step does on the machine is the step's
    (emulator/performer/steps), and which steps this device performs is its kind's
    (emulator/performer/kinds.py).
    """

    def __init__(
        self,
        config: DeviceConfig,
        on_event: Callable[[object, object], None] | None = None,
        on_beam_start: Callable[[object], None] | None = None,
        metrics: Metrics | None = None,
        inbox: SharedStorageReceiver | None = None,
    ) -> None:
        """``on_event`` sees every machine event of a delivery with its task (a beam or a
        channel), ``on_beam_start`` each task as it starts. ``inbox``: receive C-MOVE
        results through the process's shared receiver (a fleet) instead of a receiver of
        this device's own."""
        step_classes = steps_of(config.kind)
        self.config = config
        self.profile: Profile = load_profile(config.edition, config.uid_set)
        self.uids = self.profile.sop_classes
        register_uid_set(self.uids)
        self.on_event = on_event
        self.on_beam_start = on_beam_start
        callers = [config.tms.ae_title, config.archive.ae_title]
        store_dir = Path(config.data_dir) / "store"
        # The beam hold (or source retraction) goes to self.device, opened below.
        self.cancel_requests = CancelRequests(self._hold)
        self.stopping = ""  # why the operator stopped this device (stop_work), if it did
        self.receiver: StorageReceiver | ReceiverInbox = (
            inbox.attach(config.ae_title, store_dir, callers, self.cancel_requests.on_event)
            if inbox is not None
            else StorageReceiver(
                store_dir,
                config.ae_title,
                self.uids.archive_storage_uids(),
                callers,
                config.listen_host,
                config.listen_port,
                config.network,
                events=(self.uids["ups_event"], self.cancel_requests.on_event),
            )
        )
        self.clock = Clock(config.time_scale)
        self.metrics = (metrics or default_metrics()).add_actor(
            config.ae_title, config.kind, config.station
        )
        self.device: Machine = open_device(
            config.device or simulated_machine(config.kind),
            self.clock,
            {
                "interlocks": dict(config.interlocks),
                "link_observer": self.metrics,
                "timing": dict(config.device_timing),
                "machine": config.kind,
            },
        )
        self.sessions: dict[str, SessionState] = {}
        self.peers = {config.tms.ae_title: config.tms, config.archive.ae_title: config.archive}
        self.outbox = ResultOutbox(Path(config.data_dir) / "outbox.sqlite3")
        self.journal = ClaimJournal(Path(config.data_dir) / "outbox.sqlite3")
        self.tms = TmsLink(
            config.ae_title,
            config.tms,
            self.profile,
            config.network,
            Backoff(window_s=config.tms_retry_window),
        )
        context = StepContext(
            machine=self.device,
            uids=self.uids,
            station=config.station,
            metrics=self.metrics,
            journal=self.journal,
            store=self.receiver.store,
            cancel_requests=self.cancel_requests,
            store_results=self._store,
            progress=self._progress,
            on_event=lambda task, event: self.on_event and self.on_event(task, event),
            on_unit_start=lambda task: self.on_beam_start and self.on_beam_start(task),
        )
        self.steps: dict[str, Step] = {cls.name: cls(context) for cls in step_classes}

    def stop_work(self, reason: str) -> None:
        """The operator stopped this device (a signal): no new UPS is claimed, and the one
        being performed is held (its beam, its source) and ends CANCELED as an operator
        hold, with the record of what the machine measured. Safe from any thread."""
        self.stopping = reason
        self.cancel_requests.operator_stop(reason)

    def _hold(self, reason: str) -> None:
        """A cancel request heard mid-delivery: the machine holds its beam or retracts its
        source, whichever it has."""
        interrupt = getattr(self.device, "interrupt", None)
        if interrupt is not None:
            interrupt(reason)

    # -- lifecycle ---------------------------------------------------------------------------

    def point_at(self, tms: Peer, archive: Peer) -> None:
        """Sets where the TMS and the Archive are, e.g. once their free ports are known."""
        if (tms.ae_title, archive.ae_title) != (
            self.config.tms.ae_title,
            self.config.archive.ae_title,
        ):
            raise ValueError("the AE titles are fixed at construction (allow-list)")
        self.config.tms, self.config.archive = tms, archive
        self.peers = {tms.ae_title: tms, archive.ae_title: archive}
        self.tms.tms = tms

    def start(self) -> tuple[str, int]:
        """Connects the machine, refuses in one sentence a machine that lacks a role this
        kind's steps need (an afterloader asked to deliver beams), starts the receiver."""
        self.device.connect()
        try:
            for step in self.steps.values():
                role(self.device, step.role)
        except DeviceError as missing:
            self.device.close()
            raise DeviceError(f"--kind {self.config.kind}: {missing}") from missing
        self.metrics.set_connected(True)
        return self.receiver.start()

    def stop(self) -> None:
        self.tms.close()
        self.receiver.stop()
        self.outbox.close()
        self.journal.close()
        self.device.close()
        self.metrics.set_connected(False)

    def __enter__(self) -> PerformingDevice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- RO-17 -------------------------------------------------------------------------------

    def worklist_query(self, day: dt.date | None = None) -> Dataset:
        return worklist_identifier(self.config.station, day)

    def query_worklist(self) -> list[Dataset]:
        return self.tms.find(self.worklist_query())

    def run_once(self) -> list[UpsOutcome]:
        """Queries once and performs every UPS this kind takes, in session and step order.

        Before the first step of a session every input of the session is retrieved (RO-17
        Note 8: so the device knows they are available before it starts); if one is missing,
        no UPS of the session is claimed. After a step that did not complete, the later
        steps of that session are left SCHEDULED: positioning for a delivery that will not
        happen, or delivering on an unverified position, is not safe. The stop is journaled,
        so later queries, and the process after a restart, withhold those steps too.
        """
        try:
            return self._run_once()
        finally:
            self.tms.release_held()  # the run's last burst is over: free the TMS's slot

    def _run_once(self) -> list[UpsOutcome]:
        self.flush_outbox()
        outcomes: list[UpsOutcome] = self.resume_claims()
        if self.stopping:
            return outcomes
        chosen = [
            (step, ups)
            for step, ups in actors.select(self.config.kind, self.query_worklist())
            if not self.journal.withheld(str(ups.SOPInstanceUID))
        ]
        for _, members in itertools.groupby(chosen, key=lambda su: actors.session_key(su[1])):
            if self.stopping:
                break  # the sessions not begun stay SCHEDULED for the next run
            session = list(members)
            done = self._run_session(session)
            key = actors.session_label(session[0][1])
            for outcome in done:
                outcome.session = key
            self.metrics.session(session_outcome(done))
            outcomes += done
            if self.stopping and any(o.state == "SKIPPED" for o in done):
                continue  # its later steps run next time, from what the journal keeps
            # What the session kept (planning CT, CBCT) is not needed by the next one.
            self.sessions.pop(key, None)
            self.journal.session_ended(key)
        return outcomes

    def _run_session(self, session: list[tuple[str, Dataset]]) -> list[UpsOutcome]:
        problems = self._preflight(session)
        if problems:
            reason = "; ".join(problems)
            LOG.warning("session refused, no UPS claimed: %s", reason)
            return [self._outcome(step, ups, "REFUSED", reason) for step, ups in session]
        outcomes: list[UpsOutcome] = []
        for index, (step, ups) in enumerate(session):
            if self.stopping:  # left SCHEDULED, not withheld: the next run goes on with it
                why = f"not started: {self.stopping}"
                return outcomes + [self._outcome(s, u, "SKIPPED", why) for s, u in session[index:]]
            outcome = self.perform(step, ups)
            outcomes.append(outcome)
            if outcome.state != "COMPLETED":
                stopped = f"not started: {outcome.label or outcome.step} ended {outcome.state}"
                rest = session[index + 1 :]
                self.journal.withhold(
                    [str(u.SOPInstanceUID) for _, u in rest], actors.session_label(ups), stopped
                )
                outcomes += [self._outcome(s, u, "SKIPPED", stopped) for s, u in rest]
                break
        return outcomes

    @staticmethod
    def _outcome(step: str, ups: Dataset, state: str, reason: str) -> UpsOutcome:
        label = str(ups.get("ProcedureStepLabel", ""))
        return UpsOutcome(str(ups.SOPInstanceUID), step, label, state, reason)

    def _preflight(self, session: list[tuple[str, Dataset]]) -> list[str]:
        """Input checks and retrieval for every UPS of one session, before any claim."""
        problems: list[str] = []
        refs: list[InstanceReference] = []
        for step, ups in session:
            these = references_in(ups.get("InputInformationSequence") or [])
            problems += safety.input_problems(ups, set(self.peers))
            problems += self.steps[step].input_problems(ups, these)
            refs += these
        if problems:
            return problems
        try:
            held = self._retrieve(refs)
        except DimseError as exc:
            return [f"RO-18: retrieval failed: {exc}"]
        return safety.arrival_problems(refs, held)

    # -- one UPS -----------------------------------------------------------------------------

    def _retrieve(self, refs: list[InstanceReference]) -> dict[str, Dataset]:
        """RO-18/RO-20: C-MOVE what is not held yet from the AE each reference names."""
        store = self.receiver.store
        missing: dict[str, list[InstanceReference]] = {}
        for ref in refs:
            if store.get(ref.sop_instance_uid) is None:
                missing.setdefault(ref.retrieve_ae_title, []).append(ref)
        for ae_title, wanted in missing.items():
            if self.peers[ae_title] == self.tms.tms:
                self.tms.release_held()  # a TMS short of slots needs it for the C-MOVE
            # One C-MOVE per series, with the unique keys of every level above IMAGE: the
            # hierarchical form every Study Root SCP supports (PS3.4 C.4.2.2.1), not only
            # ours, which also matches relationally.
            series: dict[tuple[str, str], list[str]] = {}
            for r in wanted:
                key = (r.study_instance_uid, r.series_instance_uid)
                series.setdefault(key, []).append(r.sop_instance_uid)
            for (study_uid, series_uid), instances in series.items():
                ident = Dataset()
                ident.QueryRetrieveLevel = "IMAGE"
                ident.StudyInstanceUID = study_uid
                ident.SeriesInstanceUID = series_uid
                ident.SOPInstanceUID = instances if len(instances) > 1 else instances[0]
                scu.move(
                    self.config.ae_title,
                    self.peers[ae_title],
                    ident,
                    self.config.ae_title,
                    self.config.network,
                )
        held = {}
        for ref in refs:
            instance = store.get(ref.sop_instance_uid)
            if instance is not None:
                held[ref.sop_instance_uid] = store.read(instance)
        return held

    def perform(self, step: str, ups: Dataset) -> UpsOutcome:
        """RO-18/RO-20 checks, then the claim and the work; see :meth:`_finish` for the end."""
        uid = str(ups.SOPInstanceUID)
        outcome = UpsOutcome(uid, step, str(ups.get("ProcedureStepLabel", "")), "REFUSED")
        inputs, problems = self._inputs(step, ups)
        if problems:
            outcome.reason = "; ".join(problems)
            LOG.warning("UPS %s not claimed: %s", uid, outcome.reason)
            return outcome
        if self.stopping:
            outcome.state, outcome.reason = "SKIPPED", f"not started: {self.stopping}"
            return outcome
        claim = self._claim(step, ups, outcome)
        if claim is None:
            return outcome
        session = self._session(ups)
        watching = self._watch(uid, subscribe=True)
        claim.reporter = self._reporter(claim)
        kind = self.steps[step]
        try:
            with self.cancel_requests.performing(uid):
                claim.begin()
                self._progress(claim, 0.0, kind.start_marker(inputs))
                percent = kind.perform(Work(claim, inputs, session, outcome))
                self._honour_cancel_request(claim, percent)
                self._progress(claim, percent, None, claim.description)
                claim.results_kept()
                claim.end_as("COMPLETED", percent=percent)
        except Cancel as cancel:
            self._cancel_claim(claim, cancel)
        except (DeviceError, DimseError, ValueError) as exc:
            self.metrics.fault("dimse_error" if isinstance(exc, DimseError) else "device_error")
            self._cancel_claim(claim, Cancel(f"{type(exc).__name__}: {exc}"))
        finally:
            claim.reporter.close()
            self.device.watch_progress(None)
        finished = self._finish(claim, outcome)
        if watching:
            if finished.state in ("COMPLETED", "CANCELED"):
                self.cancel_requests.wait_for_final_report(uid, FINAL_REPORT_WAIT_S)
            self._watch(uid, subscribe=False)
        self.cancel_requests.forget(uid)
        return finished

    def _watch(self, uid: str, subscribe: bool) -> bool:
        """Subscribes this device to a claimed UPS (or unsubscribes it), so a Cancel
        Requested reaches it; a TMS without UPS Watch only costs the device that."""
        if not self.config.watch_claimed_ups:
            return False
        try:
            status = self.tms.watch(uid, subscribe, self.config.ae_title)
        except (TmsUnavailable, DimseError) as exc:
            LOG.warning("UPS %s: UPS Watch not available (%s): no cancel requests", uid, exc)
            return False
        if status != 0x0000:
            LOG.warning("UPS %s: UPS Watch answered 0x%04X: no cancel requests", uid, status)
        return status == 0x0000

    def _honour_cancel_request(self, claim: ClaimedUps, percent: float) -> None:
        """A cancel request heard while a step ran ends it CANCELED, with what it stored."""
        reason = self.cancel_requests.requested(claim.uid)
        if reason:
            cause = self.cancel_requests.cause(claim.uid)
            raise Cancel(reason, percent, list(claim.stored or []), cause=cause)

    def _inputs(self, step: str, ups: Dataset) -> tuple[StepInputs, list[str]]:
        """What the UPS needs, retrieved and checked by the workflow's rules and then by the
        step's own (its plan against the machine); the problems that forbid a claim."""
        refs = references_in(ups.get("InputInformationSequence") or [])
        problems = safety.input_problems(ups, set(self.peers))
        problems += self.steps[step].input_problems(ups, refs)
        inputs = StepInputs()
        if not problems:
            try:
                inputs.held = self._retrieve(refs)
            except DimseError as exc:
                problems = [f"RO-18: retrieval failed: {exc}"]
        problems = problems or safety.arrival_problems(refs, inputs.held)
        if not problems:
            try:
                problems = self.steps[step].read_inputs(ups, inputs, self._session(ups))
            except DeviceError as exc:
                problems = [str(exc)]
        return inputs, problems

    def _claim(self, step: str, ups: Dataset, outcome: UpsOutcome) -> ClaimedUps | None:
        """RO-19: N-ACTION IN PROGRESS; the claim is journaled the moment it is accepted."""
        uid = str(ups.SOPInstanceUID)
        # The claim is journaled before it is sent. Under TDW-II (and the final standard)
        # the device makes the Transaction UID, so after any crash it can end the claim;
        # RO-19 2008 has it sent zero length and made by the TMS (3.19.4.1.2), so a crash
        # before the reply leaves a UPS the device cannot prove is its own.
        empty = self.profile.performer_may_send_empty_transaction_uid
        sent = "" if empty else str(generate_uid())
        started = dt.datetime.now().replace(microsecond=0)
        claim = ClaimedUps.intended(self.journal, ups, step, sent, started)
        probe = progress_dataset(self.profile, sent, 0.0, None)
        try:
            reply = self.tms.claim(uid, sent, probe)
        except TmsUnavailable as exc:
            claim.not_ours()
            outcome.state, outcome.reason = "SKIPPED", f"RO-19: {exc}"
            return None
        if reply.status != 0x0000:
            claim.not_ours()
            outcome.state, outcome.reason = "SKIPPED", claim_refusal(reply, sent)
            if reply.comment == LOST_2008_CLAIM:  # perhaps left IN PROGRESS by this device
                outcome.state, outcome.reason = "FAILED", f"RO-19: {reply.comment}"
                LOG.error("UPS %s: %s", uid, reply.comment)
            return None
        self.metrics.ups_transition("IN PROGRESS")
        if not sent:
            transaction = str((reply.dataset or Dataset()).get("TransactionUID", ""))
            if not transaction:
                claim.not_ours()
                outcome.state = "FAILED"
                outcome.reason = "RO-19: the TMS created no Transaction UID; UPS left IN PROGRESS"
                return None
            claim.record.transaction_uid = transaction
        claim.accepted()
        return claim

    def _cancel_claim(self, claim: ClaimedUps, cancel: Cancel) -> None:
        LOG.warning("UPS %s will be canceled: %s", claim.uid, cancel.reason)
        claim.stored = cancel.stored
        claim.end_as("CANCELED", cancel.reason[:1024], cancel.cause, cancel.percent)

    # -- the end of a claim: RO-21 and RO-25 ---------------------------------------------------

    def _final_requests(self, claim: ClaimedUps) -> list[Dataset]:
        """The N-SETs before the final N-ACTION: for CANCELED the progress item with the
        coded reason, then RO-21's Performed Procedure Sequence with what was stored."""
        requests = []
        if claim.target == "CANCELED":
            requests.append(
                cancel_dataset(
                    claim.transaction_uid,
                    claim.record.progress,
                    claim.record.reason,
                    claim.record.cause or "device_error",
                )
            )
        requests.append(
            final_update_dataset(
                claim.ups,
                self.config.station,
                claim.transaction_uid,
                claim.started,
                claim.stored,
                self.config.archive.ae_title,
                self.uids.reference_style,
            )
        )
        own = ups_attributes.performer_missing(requests, claim.target)
        if own:  # the table says this device builds its requests wrong: a defect, say so
            LOG.error("UPS %s: the %s requests lack %s", claim.uid, claim.target, own)
        return requests

    def _finish(self, claim: ClaimedUps, outcome: UpsOutcome) -> UpsOutcome:
        """Drives a claim to the final state it aims at, or journals it as pending.

        A refusal is read (status and Error Comment) and answered by sending the final-state
        attributes again before one more try: an N-SET lost to an aborted association is
        the common cause. A UPS the TMS ended by itself is left as the TMS has it. Anything
        else leaves the claim "final transition pending", retried by :meth:`settle` and by
        the next process on the same data dir.
        """
        target = claim.target
        outcome.stored = [str(ds.SOPInstanceUID) for ds in claim.stored]
        why = ""
        for attempt in range(2):
            try:
                refused = [
                    status
                    for ds in self._final_requests(claim)
                    if (status := self.tms.n_set(claim.uid, ds)) != 0x0000
                ]
                if claim.state != "final_update_sent":
                    claim.final_update_sent()
                extra = None
                if target == "CANCELED":  # seed RO-18 3.18.4.1: the reason goes with it too
                    extra = Dataset()
                    extra.ReasonForCancellation = claim.record.reason
                reply = self.tms.change_state(claim.uid, target, claim.transaction_uid, extra)
            except TmsUnavailable as exc:
                return self._pending(claim, outcome, str(exc))
            if reply.status == 0x0000:
                return self._accepted(claim, outcome)
            why = f"{target} refused (0x{reply.status:04X}" + (
                f": {reply.comment})" if reply.comment else ")"
            )
            if refused:
                why += f" after N-SET statuses {', '.join(f'0x{s:04X}' for s in refused)}"
            held_as = self._state_at_tms(claim)
            if held_as in ups_attributes.FINAL_STATES:
                claim.journal.ended(claim.uid)
                outcome.state = held_as
                outcome.reason = f"{claim.record.reason}; the TMS ended it {held_as}".lstrip("; ")
                return outcome
            LOG.warning("UPS %s: %s (attempt %d)", claim.uid, why, attempt + 1)
        return self._pending(claim, outcome, why)

    def _accepted(self, claim: ClaimedUps, outcome: UpsOutcome) -> UpsOutcome:
        target = claim.target
        if target == "COMPLETED":
            claim.accepted_completed()
        else:
            claim.accepted_canceled()
        self.metrics.ups_transition(target)
        outcome.state = target
        outcome.reason = claim.record.reason if target == "CANCELED" else outcome.reason
        self._report_pending()
        return outcome

    def _pending(self, claim: ClaimedUps, outcome: UpsOutcome, why: str) -> UpsOutcome:
        LOG.error("UPS %s: final transition pending: %s", claim.uid, why)
        claim.defer()
        outcome.state = "FINAL PENDING"
        before = f"{claim.record.reason}; " if claim.record.reason else ""
        outcome.reason = f"{before}{claim.target} not yet accepted: {why}"
        self._report_pending()
        return outcome

    def _state_at_tms(self, claim: ClaimedUps) -> str:
        try:
            reply = self.tms.n_get(claim.uid, ["ProcedureStepState", "ProcedureStepLabel"])
        except TmsUnavailable:
            return ""
        return str((reply.dataset or Dataset()).get("ProcedureStepState", "") or "")

    def _report_pending(self) -> None:
        pending = [c for c in self.journal.open_claims() if c.state == "final_pending"]
        self.metrics.set_final_pending(len(pending))

    def pending_claims(self) -> list[Claim]:
        """Claims whose final transition the TMS has not accepted yet."""
        return [c for c in self.journal.open_claims() if c.state == "final_pending"]

    def settle(self, window_s: float) -> list[UpsOutcome]:
        """Retries the pending final transitions with backoff until none is left or
        ``window_s`` has passed; returns the outcome of each claim that ended meanwhile."""
        ended: list[UpsOutcome] = []
        delays = iter(Backoff(window_s, 0.5, 10.0).delays(random.Random()))
        while self.pending_claims():
            pause = next(delays, None)
            if pause is None:
                break
            time.sleep(pause)
            ended += [o for o in self.resume_claims() if o.state != "FINAL PENDING"]
        return ended

    # -- after a restart ---------------------------------------------------------------------

    def resume_claims(self) -> list[UpsOutcome]:
        """Ends every UPS this device still holds: left IN PROGRESS by a killed process, or
        whose final transition is pending.

        Work that was done and whose results the Archive holds is completed with them;
        anything else is canceled with the progress last reported and the results that
        were stored, never more. A claim whose results are still pending waits for the
        outbox: it is not ended without them.
        """
        outcomes = []
        for record in self.journal.open_claims():
            results = self.outbox.for_ups(record.ups_uid)
            if self.outbox.pending(results):
                LOG.warning("UPS %s: results still pending; ended later", record.ups_uid)
                continue
            outcome = self._resume(ClaimedUps(record, self.journal), results)
            if outcome is not None:  # None: a claim being sent that never landed
                outcomes.append(outcome)
        return outcomes

    def _resume(self, claim: ClaimedUps, results: list[str]) -> UpsOutcome | None:
        outcome = UpsOutcome(claim.uid, claim.step, "", "FINAL PENDING")
        store = self.receiver.store
        claim.stored = [store.read(store.get(r), stop_before_pixels=True) for r in results]
        keys = [
            "ProcedureStepState",
            "ProcedureStepLabel",
            "ScheduledWorkitemCodeSequence",
            "PatientID",
            "ScheduledProcedureStepStartDateTime",
        ]
        try:
            reply = self.tms.n_get(claim.uid, keys)
        except TmsUnavailable as exc:
            outcome.reason = f"still held: {exc}"
            return outcome
        ups = reply.dataset or Dataset()
        state = str(ups.get("ProcedureStepState", "") or "")
        outcome.label = str(ups.get("ProcedureStepLabel", "") or "")
        if claim.state == "claiming" and (reply.status != 0x0000 or state != "IN PROGRESS"):
            LOG.info("UPS %s: the claim a killed process was sending never landed", claim.uid)
            claim.not_ours()
            return None
        if reply.status != 0x0000 or state != "IN PROGRESS":
            claim.journal.ended(claim.uid)
            outcome.state = state if state in ups_attributes.FINAL_STATES else "SKIPPED"
            if reply.status == 0x0000 and state == claim.record.target:
                # An earlier process decided this end and was killed after the TMS took it,
                # before its journal heard so: settled, with the reason it was decided for.
                outcome.settled = True
                outcome.reason = claim.record.reason or "ended before the device restarted"
            else:
                outcome.reason = f"after a restart: the TMS has it {state or 'unknown'}"
            return outcome
        ups.SOPInstanceUID = claim.uid
        claim.ups = ups
        if claim.state == "claiming":
            # Killed while the claim was on its way: the UPS is IN PROGRESS, but whose? Only
            # the claimer's Transaction UID is accepted on an N-SET (PS3.4 CC.2.1.3).
            if not claim.transaction_uid:
                LOG.error(
                    "UPS %s is IN PROGRESS and may be this device's: it was killed before the "
                    "TMS's Transaction UID reached it (RO-19 2008 sends it zero length), so it "
                    "cannot end it; the TMS must",
                    claim.uid,
                )
                claim.not_ours()
                outcome.state = "FAILED"
                outcome.reason = (
                    "killed mid-claim: IN PROGRESS at the TMS with a UID never received"
                )
                return outcome
            probe = progress_dataset(self.profile, claim.transaction_uid, 0.0, None)
            if self.tms.n_set(claim.uid, probe) != 0x0000:
                LOG.info(
                    "UPS %s: another device claimed it; this one's claim never landed", claim.uid
                )
                claim.not_ours()
                return None
            claim.accepted()
        if claim.state == "final_pending" or claim.record.target:
            outcome.settled = True
            return self._finish(claim, outcome)
        if claim.state in ("results_stored", "final_update_sent"):
            claim.end_as("COMPLETED")
            outcome.reason = "completed after the device restarted"
            return self._finish(claim, outcome)
        cancel = Cancel(
            f"the device restarted while performing the {claim.step}; "
            "what was stored before is in the Output Information",
            claim.record.progress,
            claim.stored,
            cause="restart",
        )
        if not claim.stored and claim.step in self.steps:
            try:
                cancel = self.steps[claim.step].after_restart(claim.record, outcome) or cancel
            except Cancel as not_taken:
                # The rebuilt record is spooled; the UPS is ended once it is stored.
                outcome.reason = not_taken.reason
                return outcome
        # The session's later steps are not performed after this one was canceled.
        self._withhold_rest(ups, claim.step, f"not started: {claim.step} canceled")
        self._cancel_claim(claim, cancel)
        return self._finish(claim, outcome)

    def _withhold_rest(self, ups: Dataset, step: str, reason: str) -> None:
        """Journals the later steps of ``ups``'s session on the worklist now as withheld."""
        key = actors.session_key(ups)
        try:
            worklist = actors.select(self.config.kind, self.query_worklist())
        except TmsUnavailable as exc:
            LOG.warning("later steps of %s not looked up: %s", actors.session_label(ups), exc)
            return
        later = [
            str(other.SOPInstanceUID)
            for other_step, other in worklist
            if actors.session_key(other) == key
            and actors.STEP_ORDER.index(other_step) > actors.STEP_ORDER.index(step)
        ]
        self.journal.withhold(later, actors.session_label(ups), reason)

    # -- the work ----------------------------------------------------------------------------

    def _session(self, ups: Dataset) -> SessionState:
        """This session's state: in memory, else as a previous process journaled it."""
        key = actors.session_label(ups)
        if key not in self.sessions:
            state = self.journal.session(key)
            self.sessions[key] = (
                SessionState.from_journal(state, self.receiver.store) if state else SessionState()
            )
        return self.sessions[key]

    # -- messages ----------------------------------------------------------------------------

    def _store(
        self, objects: list[Dataset], transaction: str, ups_uid: str, percent: float = 100.0
    ) -> list[Dataset]:
        """Keeps each result locally and in the outbox, then stores it to the Archive,
        retrying with backoff; raises Cancel when the Archive still has not taken it.

        ``percent`` is the progress actually reached, reported if the UPS must be canceled.
        """
        for ds in objects:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            encoded = buffer.getvalue()
            self.receiver.store.put(encoded, admit(encoded), calling_ae="self")
        uids = [str(ds.SOPInstanceUID) for ds in objects]
        self.outbox.add(uids, ups_uid)
        self._report_backlog()
        error = ""
        for delay in self.config.store_retry.delays():
            time.sleep(delay)
            error = self._send(uids)
            if not error:
                return objects
            LOG.warning("%s: results not stored yet (%s); retrying", transaction, error)
        raise Cancel(
            f"{transaction}: the Archive did not take the results after "
            f"{self.config.store_retry.attempts} attempts ({error}); they are kept and "
            "will be sent again",
            percent,
        )

    def _send(self, uids: list[str]) -> str:
        """Sends the pending ones among ``uids`` as stored (same bytes, same UIDs); returns
        the error, or "" when the Archive acknowledged them all."""
        pending = self.outbox.pending(uids)
        if not pending:
            return ""
        store = self.receiver.store
        files = [store.path_for(store.get(uid).sha256) for uid in pending]

        def acknowledged(ds: Dataset) -> None:
            self.outbox.sent(str(ds.SOPInstanceUID))

        try:
            scu.store(
                self.config.ae_title,
                self.config.archive,
                files,
                self.config.network,
                on_stored=acknowledged,
            )
        except DimseError as exc:
            self.outbox.failed(self.outbox.pending(pending), str(exc))
            return str(exc)
        finally:
            self._report_backlog()
        return ""

    def flush_outbox(self) -> int:
        """Sends every result still pending (an earlier Archive outage, or a previous run
        of this device on the same data dir); returns how many remain pending."""
        pending = self.outbox.pending()
        if pending:
            error = self._send(pending)
            if error:
                LOG.warning("%d results still pending: %s", len(pending), error)
        return len(self.outbox.pending())

    def _report_backlog(self) -> None:
        self.metrics.set_backlog(len(self.outbox.pending()))

    def _reporter(self, claim: ClaimedUps) -> ProgressReporter:
        """RO-26 for one claim: every report rises; one refused in the middle of a beam
        holds the beam, as a cancel request does (the TMS no longer has the UPS IN PROGRESS
        for this device)."""

        def send(percent: float, beam: int | None, description: str = "") -> int:
            ds = progress_dataset(self.profile, claim.transaction_uid, percent, beam, description)
            try:
                return self.tms.n_set(claim.uid, ds, patient=False)
            except TmsUnavailable as exc:
                # The work goes on; the final update tells the TMS everything anyway.
                LOG.warning("RO-26 progress %.0f %% not reported: %s", percent, exc)
                return 0x0000

        def refused(status: int) -> None:
            self.cancel_requests.tms_ended(
                claim.uid, f"RO-26: the TMS refused a progress update (0x{status:04X})"
            )

        return ProgressReporter(send, self.config.progress_every_s, refused)

    def _progress(
        self, claim: ClaimedUps, percent: float, beam: int | None, description: str = ""
    ) -> None:
        """RO-26: progress, and the Referenced Beam Number in Progress when there is one.

        A TMS that cannot be reached right now does not stop the work (the final update
        will tell it everything); a TMS that refuses the update does: it no longer has the
        UPS IN PROGRESS for this device.
        """
        try:
            claim.reporter.report_now(percent, beam, description)
        except ProgressRefused as refused:
            raise Cancel(str(refused), refused.percent, cause="tms_request") from refused
        claim.progressed(percent)
