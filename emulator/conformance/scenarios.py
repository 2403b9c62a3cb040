"""Runs the scenario suite of ``profiles/scenarios.yaml`` against a TMS and its Archive.

Each step sends real DICOM (through the same performing devices and UPS association the
emulator always uses) and compares what came back with the step's expectation. All traffic
is recorded; after each scenario the message and Appendix A rules are applied to it, so a
TMS fails either a stated expectation or a named rule, and every failure cites the clause.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from emulator import ups_attributes, ups_events
from emulator.brachy_fraction import recorded_source, treated_at
from emulator.conformance.brachy_rules import brachy_record_problems
from emulator.conformance.exercise import exercised_rules, traffic_kinds
from emulator.conformance.message_rules import (
    CheckContext,
    check_traffic,
    delivery_type_parameter,
)
from emulator.conformance.rulebook import Finding, RuleBook
from emulator.conformance.suite import Scenario, load_scenarios
from emulator.conformance.traffic import TrafficRecorder
from emulator.net import scu
from emulator.net.ae_factory import NetworkSettings
from emulator.net.event_scp import EventReceiver, UpsEventNotice
from emulator.net.peers import Peer
from emulator.net.receiver import StorageReceiver
from emulator.net.scu import DimseError
from emulator.net.ups_scu import UpsConnection
from emulator.performer import actors
from emulator.performer.workflow import (
    DeviceConfig,
    PerformingDevice,
    UpsOutcome,
    cancel_dataset,
    final_update_dataset,
    progress_dataset,
    worklist_identifier,
)
from emulator.profile import Profile, load_profile
from emulator.results.brachy_record import delivered_channel_times
from emulator.synth.brachy_access import planned_channels, planned_source
from emulator.synth.plan_access import specified_metersets
from emulator.ups_references import references_in

SUCCESS = "success"
# Scenario names of the UPS Event types (profiles/ups_events.yaml).
EVENT_TYPES = {
    "state_report": ups_events.STATE_REPORT,
    "cancel_requested": ups_events.CANCEL_REQUESTED,
    "progress_report": ups_events.PROGRESS_REPORT,
    "scp_status_change": ups_events.SCP_STATUS_CHANGE,
}


@dataclass
class StepResult:
    index: int
    action: str
    rule: str
    ok: bool
    expected: str
    observed: str
    seconds: float
    message: str = ""


@dataclass
class ScenarioResult:
    scenario: Scenario
    steps: list[StepResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    first_seq: int = 0
    last_seq: int = 0
    # Rules (as cited) the scenario gave nothing to judge: reported skipped, not passed.
    skipped_rules: list[str] = field(default_factory=list)
    # What the suite did at the end to leave nothing IN PROGRESS at the TMS, and what it
    # could not end (a UPS whose Transaction UID came only in a lost reply).
    cleanup: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and all(s.ok for s in self.steps)
            and not any(f.fails for f in self.findings)
        )


@dataclass
class SuiteConfig:
    """Where the TMS and Archive are, and the AEs the emulated devices use."""

    tms: Peer
    archive: Peer
    devices: list[Peer]
    edition: str = "ihe-ro-2008"
    uid_set: str = "final"
    data_dir: Path | None = None
    network: NetworkSettings = field(default_factory=NetworkSettings)
    query_timeout: float = 30.0
    # Where the devices' receivers bind; None: the host each device is announced at (its
    # --device address, which the TMS's Archive must be able to reach).
    listen_host: str | None = None
    # How long a reply may take before it is a DIMSE/Reply finding (None: the rule book's
    # exchange_timeout_s); the suite waits longer (suite_patience) before it gives up.
    dimse_timeout: float | None = None


class StepFailed(Exception):
    """A step could not even be carried out (the TMS refused the association, ...)."""


class SuiteError(Exception):
    """The suite's own request broke PS3.4 Table CC.2.5-3: whatever the TMS answered says
    nothing about the TMS, so the scenario reports an error and holds no finding."""


def _status_text(status: int | None) -> str:
    return "none" if status is None else f"0x{status:04X}"


def _status_matches(expected: Any, status: int | None) -> bool:
    if status is None:
        return False
    if expected == SUCCESS:
        return status == 0 or (status & 0xF000) == 0xB000 or status == 0x0001
    return status == int(expected)


def _expect_text(expected: Any) -> str:
    """An expectation as a report shows it: every DIMSE status in hex (0xC302, not 49922)."""
    if isinstance(expected, bool):
        return str(expected)
    if isinstance(expected, int):
        return f"0x{expected:04X}"
    if isinstance(expected, dict):
        parts = [
            f"{key}: {_expect_text(value) if 'status' in str(key) else value}"
            for key, value in expected.items()
        ]
        return "{" + ", ".join(parts) + "}"
    return str(expected)


class ScenarioRunner:
    """Runs scenarios one after another; one recorder sees all their traffic."""

    def __init__(self, config: SuiteConfig, recorder: TrafficRecorder | None = None) -> None:
        self.config = config
        self.recorder = recorder or TrafficRecorder()
        self.profile: Profile = load_profile(config.edition, config.uid_set)
        self.book = RuleBook.load(config.edition)
        tables = self.book.tables()
        self.reply_within_s = float(config.dimse_timeout or tables["exchange_timeout_s"])
        patience = tables["suite_patience"]
        waits = max(
            self.reply_within_s * patience["factor"], self.reply_within_s + patience["at_least_s"]
        )
        # A late reply is still read (and judged late) rather than lost to an abort.
        self.network = replace(
            config.network, observers=self.recorder.handlers, dimse_timeout=waits
        )
        if len(config.devices) < 2:
            raise ValueError("the suite needs two device AEs (PPS/TDD splits, races)")
        self._tmp = tempfile.TemporaryDirectory(prefix="tdw-scenarios-")
        self.root = Path(config.data_dir or self._tmp.name)
        # A stop asked by the operator (SIGINT): no further step or scenario starts, the
        # devices performing end what they claimed, every scenario's cleanup still runs.
        self.stopping = ""
        self._active: set[PerformingDevice] = set()

    def stop(self, reason: str) -> None:
        """Stops the suite at the next step; a device performing now ends its UPS."""
        self.stopping = reason
        for device in list(self._active):
            device.stop_work(reason)

    def close(self) -> None:
        self._tmp.cleanup()

    # -- the suite -----------------------------------------------------------------------------

    def run(self, scenarios: list[Scenario]) -> list[ScenarioResult]:
        results = []
        for scenario in scenarios:
            if self.stopping:
                break
            results.append(self.run_one(scenario))
        return results

    def run_one(self, scenario: Scenario) -> ScenarioResult:
        result = ScenarioResult(scenario, first_seq=self.recorder.last_seq)
        state = _ScenarioState(scenario, self.root / scenario.name)
        started = time.monotonic()
        for index, step in enumerate(scenario.steps, start=1):
            if self.stopping:
                result.error = f"interrupted: {self.stopping}; not judged"
                break
            self.recorder.label = f"{scenario.name}/{index}-{step['action']}"
            t0 = time.monotonic()
            try:
                ok, expected, observed, message = self._step(state, step)
            except SuiteError as exc:
                result.error = f"suite error: {exc}"
                result.steps.append(
                    StepResult(index, step["action"], self.book.cite(step.get("rule", "")), False,
                               _expect_text(step.get("expect", "")), "suite error", 0.0, str(exc))
                )  # fmt: skip
                break
            except (StepFailed, DimseError, OSError, RuntimeError, ValueError) as exc:
                ok, expected, observed = False, _expect_text(step.get("expect", "")), "error"
                message = f"{type(exc).__name__}: {exc}"
            result.steps.append(
                StepResult(
                    index,
                    step["action"],
                    self.book.cite(step.get("rule", "")),
                    ok,
                    expected,
                    observed,
                    round(time.monotonic() - t0, 3),
                    message,
                )
            )
            if not ok and step["action"] in ("query", "claim") and not state.ups:
                break  # nothing further can be addressed
        self.recorder.label = f"{scenario.name}/cleanup"
        result.cleanup = self._leave_nothing_in_progress(state)
        state.close()
        self.recorder.label = ""
        time.sleep(0.05)  # let the last association-release events land
        result.last_seq = self.recorder.last_seq
        context = CheckContext(
            self.profile,
            self.book,
            self.config.tms.ae_title,
            self.config.archive.ae_title,
            self.reply_within_s,
            afterloader_stations=frozenset(
                s.station for s in load_scenarios() if s.kind == "afterloader"
            ),
        )
        messages = [m for m in self.recorder.since(result.first_seq) if m.seq <= result.last_seq]
        result.findings = check_traffic(self.recorder, context, messages=messages)
        if result.error:
            result.findings = []  # the suite was wrong: nothing it saw is held against the TMS
        provoked = {self.book.cite(r) for r in scenario.expected_findings}
        for finding in result.findings:
            if finding.rule in provoked:
                finding.expected = True
        kinds = traffic_kinds(
            self.recorder,
            messages,
            self.profile,
            (self.config.tms.ae_title, self.config.archive.ae_title),
        )
        exercised = exercised_rules(self.book, kinds, (s.get("rule", "") for s in scenario.steps))
        result.skipped_rules = [
            rule.cited
            for rule_id, rule in self.book.rules.items()
            if rule_id not in exercised and not any(f.rule == rule.cited for f in result.findings)
        ]
        for step_result, step in zip(result.steps, scenario.steps, strict=False):
            wanted = (step.get("expect") or {}).get("findings")
            if wanted:
                found = {f.rule for f in result.findings}
                missing = [self.book.cite(r) for r in wanted if self.book.cite(r) not in found]
                if missing:
                    step_result.ok = False
                    step_result.message += f" expected finding(s) {missing} were not made"
        result.seconds = round(time.monotonic() - started, 3)
        return result

    # -- the end of a scenario -------------------------------------------------------------------

    def _leave_nothing_in_progress(self, state: _ScenarioState) -> list[str]:
        """Ends, CANCELED, every UPS the scenario's own claims left IN PROGRESS (a step that
        failed, a reply that came late or never), with the Transaction UIDs it sent or was
        given; says what it ended and what it could not."""
        notes = []
        for step, ups in state.ups.items():
            uids = [t for (s, _), t in state.claims.items() if s == step]
            uids += state.attempted.get(step, [])
            if not uids:
                continue
            uid = str(ups.SOPInstanceUID)
            try:
                with self._connection() as tms:
                    held = str(
                        (tms.n_get(uid, ["ProcedureStepState", "ProcedureStepLabel"]).dataset
                         or Dataset()).get("ProcedureStepState", "")
                    )  # fmt: skip
                    if held != "IN PROGRESS":
                        continue
                    ended = self._cancel_own(tms, ups, list(dict.fromkeys(uids)), state)
            except (DimseError, OSError, RuntimeError) as exc:
                notes.append(f"{step} UPS {uid} not ended: {exc}")
                continue
            notes.append(
                f"{step} UPS {uid} was left IN PROGRESS: "
                + (f"ended CANCELED ({ended})" if ended else "the Transaction UID of its claim "
                   "came only in a lost reply (RO-19 2008); the TMS must end it")
            )  # fmt: skip
        return notes

    def _cancel_own(
        self, tms: UpsConnection, ups: Dataset, transactions: list[str], state: _ScenarioState
    ) -> str:
        """N-SETs the cancellation and the final update with each Transaction UID in turn
        until one is the claim's, then N-ACTION CANCELED; returns its status ("" if none of
        the UIDs was the claim's)."""
        uid = str(ups.SOPInstanceUID)
        reason = "ended by the conformance suite: the scenario could not finish it"
        for transaction in transactions:
            if tms.n_set(uid, cancel_dataset(transaction, 0.0, reason, "operator_hold")) != 0:
                continue
            final = final_update_dataset(
                ups,
                state.scenario.station,
                transaction,
                state.started.get(actors.step_of(ups) or "", dt.datetime.now()),
                [],
                self.config.archive.ae_title,
                self.profile.sop_classes.reference_style,
            )
            tms.n_set(uid, final)
            extra = Dataset()
            extra.ReasonForCancellation = reason
            reply = tms.change_state(uid, "CANCELED", transaction, extra)
            return f"0x{reply.status:04X}"
        return ""

    # -- steps -----------------------------------------------------------------------------------

    def _step(self, state: _ScenarioState, step: dict) -> tuple[bool, str, str, str]:
        action = step["action"]
        handler = getattr(self, f"_do_{action}", None)
        if handler is None:
            raise ValueError(f"unknown scenario action {action!r}")
        return handler(state, step, step.get("expect") or {})

    def _connection(self, device: int = 0) -> UpsConnection:
        peer = self.config.devices[device % len(self.config.devices)]
        return UpsConnection(peer.ae_title, self.config.tms, self.profile, self.network)

    def _device(self, state: _ScenarioState, kind: str, index: int, **extra) -> PerformingDevice:
        peer = self.config.devices[index]
        config = DeviceConfig(
            kind=kind,
            station=state.scenario.station,
            ae_title=peer.ae_title,
            tms=self.config.tms,
            archive=self.config.archive,
            data_dir=state.root / f"{peer.ae_title}-{kind}-{len(state.outcomes)}",
            listen_host=self.config.listen_host or peer.host,
            listen_port=peer.port,
            edition=self.config.edition,
            uid_set=self.config.uid_set,
            network=self.network,
            **extra,
        )
        device = PerformingDevice(config)
        self._active.add(device)
        if self.stopping:
            device.stop_work(self.stopping)
        return device

    def _query(self, state: _ScenarioState, device: int = 0) -> list[Dataset]:
        with self._connection(device) as tms:
            found = tms.find(worklist_identifier(state.scenario.station))
        state.remember(found)
        return found

    def _ups_of(self, state: _ScenarioState, step: dict) -> Dataset:
        ups = state.ups.get(step["step"])
        if ups is None:
            raise StepFailed(f"no {step['step']} UPS known from the worklist")
        return ups

    def _transaction(self, state: _ScenarioState, step: dict) -> str | None:
        choice = step.get("transaction", "right")
        if choice == "none":
            return None
        if choice in ("wrong", "new"):
            return str(generate_uid())
        claimed = state.claims.get((step["step"], "first"))
        if claimed is None:
            raise StepFailed(f"the {step['step']} UPS was not claimed in this scenario")
        return claimed

    def _judge_status(self, expect: dict, status: int | None) -> tuple[bool, str, str]:
        wanted = expect.get("status", SUCCESS)
        return _status_matches(wanted, status), _expect_text(wanted), _status_text(status)

    def _outcome_checks(
        self, state: _ScenarioState, outcomes: list[UpsOutcome], expect: dict
    ) -> tuple[bool, str, str]:
        counts = Counter(o.state for o in outcomes)
        problems = []
        if "ups" in expect and dict(counts) != {k: int(v) for k, v in expect["ups"].items()}:
            problems.append("UPS outcomes differ")
        deliveries = [o for o in outcomes if o.step == "delivery" and o.delivery_type]
        if "delivery_type" in expect and not any(
            o.delivery_type == expect["delivery_type"] for o in deliveries
        ):
            problems.append(f"no {expect['delivery_type']} delivery")
        if expect.get("metersets") == "complete":
            problems += state.meterset_problems()
        if expect.get("records") == "brachy":
            problems += state.brachy_record_problems()
        if expect.get("dwell_times") == "complete":
            problems += state.dwell_time_problems()
        observed = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no UPS"
        reasons = sorted({o.reason for o in outcomes if o.reason})
        if reasons:
            observed += " (" + "; ".join(r[:160] for r in reasons) + ")"
        if problems:
            observed += " - " + "; ".join(problems)
        judged = ("ups", "delivery_type", "metersets", "records", "dwell_times")
        wanted = {k: v for k, v in expect.items() if k in judged}
        return not problems, str(wanted), observed

    def _do_perform(self, state: _ScenarioState, step: dict, expect: dict):
        kind = step.get("device", "pds")
        index = 0 if kind in ("pds", "pps") else 1
        interlocks = {}
        if step.get("interrupt"):
            beam, mu = str(step["interrupt"]).split(":")
            interlocks = {int(beam): float(mu)}
        device = self._device(state, kind, index, interlocks=interlocks)
        with device:
            outcomes = device.run_once()
            if device.pending_claims():  # ends what it claimed before the scenario goes on
                outcomes += device.settle(self.reply_within_s)
            state.collect(device, outcomes)
        ok, wanted, observed = self._outcome_checks(state, outcomes, expect)
        return ok, wanted, observed, ""

    def _do_query(self, state: _ScenarioState, step: dict, expect: dict):
        found = self._query(state)
        problems = []
        sessions = {actors.session_key(u) for u in found}
        if "ups" in expect and len(found) != int(expect["ups"]):
            problems.append(f"{len(found)} UPS")
        if "sessions" in expect and len(sessions) != int(expect["sessions"]):
            problems.append(f"{len(sessions)} session(s)")
        steps = sorted(str(actors.step_of(u)) for u in found)
        if "steps" in expect and steps != sorted(expect["steps"]):
            problems.append(f"steps {steps}")
        types = sorted(_delivery_types(found, self.profile))
        if "delivery_type" in expect and types != [expect["delivery_type"]]:
            problems.append(f"Treatment Delivery Type {types or 'absent'}")
        observed = f"{len(found)} UPS in {len(sessions)} session(s), steps {steps}"
        if types:
            observed += f", delivery {types}"
        wanted = {k: v for k, v in expect.items() if k != "findings"}
        return not problems, str(wanted), observed, "; ".join(problems)

    def _claim(self, state: _ScenarioState, step_name: str, device: int) -> tuple[int, str]:
        empty = self.profile.performer_may_send_empty_transaction_uid
        sent = "" if empty else str(generate_uid())
        if sent:  # if the reply is lost, the UID still ends the claim at cleanup
            state.attempted.setdefault(step_name, []).append(sent)
        with self._connection(device) as tms:
            reply = tms.change_state(str(state.ups[step_name].SOPInstanceUID), "IN PROGRESS", sent)
        given = str((reply.dataset or Dataset()).get("TransactionUID", "") or "")
        return reply.status, sent or given

    def _do_claim(self, state: _ScenarioState, step: dict, expect: dict):
        self._ups_of(state, step)
        name = step.get("as", "first")
        status, transaction = self._claim(state, step["step"], 0 if name == "first" else 1)
        if status == 0 and transaction:
            state.claims.setdefault((step["step"], name), transaction)
            state.started.setdefault(step["step"], dt.datetime.now().replace(microsecond=0))
        ok, wanted, observed = self._judge_status(expect, status)
        return ok, wanted, observed, ""

    def _do_retrieve(self, state: _ScenarioState, step: dict, expect: dict):
        """C-MOVE of what the UPS's inputs hold at ``source`` to the first device, whenever
        the scenario says (TDW-II lets RO-61 follow the RO-60 claim)."""
        ups = self._ups_of(state, step)
        source = self.config.tms if step.get("source", "tms") == "tms" else self.config.archive
        refs = [
            r
            for r in references_in(ups.get("InputInformationSequence") or [])
            if r.retrieve_ae_title == source.ae_title
        ]
        if not refs:
            raise StepFailed(f"the {step['step']} UPS names no input at {source.ae_title}")
        device = self.config.devices[0]
        receiver = StorageReceiver(
            state.root / f"retrieve-{len(state.outcomes)}",
            device.ae_title,
            self.profile.sop_classes.archive_storage_uids(),
            None,
            self.config.listen_host or device.host,
            device.port,
            self.network,
        )
        status, completed = None, 0
        with receiver:
            for ref in refs:
                ident = ref.move_identifier()
                try:
                    result = scu.move(device.ae_title, source, ident, device.ae_title, self.network)
                except DimseError as exc:
                    status = exc.status
                    break
                status, completed = result.status, completed + result.completed
        ok, wanted, observed = self._judge_status(expect, status)
        if "completed" in expect:
            wanted += f", {expect['completed']} completed"
            ok = ok and completed >= int(expect["completed"])
        return ok, wanted, f"{observed}, {completed} completed", ""

    def _do_subscribe(self, state: _ScenarioState, step: dict, expect: dict):
        """UPS Watch subscribe (CC.2.3.1) of the first device's AE to the ``step`` UPS (or
        globally), its events received by an Event SCP at the device's address."""
        device = self.config.devices[0]
        if state.event_receiver is None:
            state.event_receiver = EventReceiver(
                device.ae_title,
                self.profile.sop_classes["ups_event"],
                state.events.put,
                [self.config.tms.ae_title],
                self.config.listen_host or device.host,
                device.port,
                self.network,
            )
            state.event_receiver.start()
        target = self._watch_target(state, step)
        with self._connection() as tms:
            status = tms.watch_action(target, ups_events.SUBSCRIBE, device.ae_title)
        ok, wanted, observed = self._judge_status(expect, status)
        return ok, wanted, observed, ""

    def _do_unsubscribe(self, state: _ScenarioState, step: dict, expect: dict):
        target = self._watch_target(state, step)
        with self._connection() as tms:
            status = tms.watch_action(
                target, ups_events.UNSUBSCRIBE, self.config.devices[0].ae_title
            )
        ok, wanted, observed = self._judge_status(expect, status)
        return ok, wanted, observed, ""

    def _watch_target(self, state: _ScenarioState, step: dict) -> str:
        if step.get("step"):
            return str(self._ups_of(state, step).SOPInstanceUID)
        return ups_events.global_instances()[0]

    def _do_request_cancel(self, state: _ScenarioState, step: dict, expect: dict):
        """N-ACTION Request Cancel (CC.2.2) from the second device's AE, as an operator
        console would send it while the first device performs the UPS."""
        ups = self._ups_of(state, step)
        info = Dataset()
        info.ReasonForCancellation = str(step.get("reason", "requested by the scenario"))
        with self._connection(device=1) as tms:
            reply = tms.request_cancel(str(ups.SOPInstanceUID), info)
        ok, wanted, observed = self._judge_status(expect, reply.status)
        return ok, wanted, observed, reply.comment

    def _do_expect_event(self, state: _ScenarioState, step: dict, expect: dict):
        """Waits up to ``within_s`` for an event of ``event`` (a Table CC.2.4-1 type name)
        about the ``step`` UPS (and reporting ``state``, for a State Report)."""
        wanted_type = EVENT_TYPES[str(expect["event"])]
        uid = str(self._ups_of(state, step).SOPInstanceUID) if step.get("step") else ""
        wanted_state = expect.get("state")
        deadline = time.monotonic() + float(expect.get("within_s", 5.0))
        described = f"{expect['event']}" + (f" {wanted_state}" if wanted_state else "")
        while True:
            for notice in state.seen_events:
                if notice.event_type != wanted_type or (uid and notice.ups_uid != uid):
                    continue
                if wanted_state and notice.info.get("ProcedureStepState") != wanted_state:
                    continue
                state.seen_events.remove(notice)
                return True, described, f"{described} received", ""
            left = deadline - time.monotonic()
            if left <= 0:
                got = ", ".join(ups_events.event_name(n.event_type) for n in state.seen_events)
                return False, described, f"not received (others: {got or 'none'})", ""
            with contextlib.suppress(queue.Empty):
                state.seen_events.append(state.events.get(timeout=min(left, 0.2)))

    def _do_progress(self, state: _ScenarioState, step: dict, expect: dict):
        ups = self._ups_of(state, step)
        ds = progress_dataset(
            self.profile, self._transaction(state, step), float(step.get("percent", 0)), None
        )
        return self._n_set_step(ups, ds, expect, state)

    def _n_set_step(self, ups: Dataset, ds: Dataset, expect: dict, state: _ScenarioState):
        # What the suite sent is what judges the suite's own requests; what the TMS made of
        # it (a refusal, a status PS3.4 does not define) is the TMS's finding.
        state.sent.setdefault(str(ups.SOPInstanceUID), []).append(ds)
        with self._connection() as tms:
            reply = tms.n_set_reply(str(ups.SOPInstanceUID), ds)
        ok, wanted, observed = self._judge_status(expect, reply.status)
        return ok, wanted, observed, reply.comment

    def _do_final_update(self, state: _ScenarioState, step: dict, expect: dict):
        ups = self._ups_of(state, step)
        ds = final_update_dataset(
            ups,
            state.scenario.station,
            self._transaction(state, step),
            state.started.get(step["step"], dt.datetime.now()),
            [],
            self.config.archive.ae_title,
            self.profile.sop_classes.reference_style,
        )
        return self._n_set_step(ups, ds, expect, state)

    def _do_change_state(self, state: _ScenarioState, step: dict, expect: dict):
        ups = self._ups_of(state, step)
        uid = str(ups.SOPInstanceUID)
        transaction = self._transaction(state, step)
        target = step["state"]
        note = ""
        with self._connection() as tms:
            extra = None
            if target == "CANCELED":
                reason = str(step.get("reason", "canceled by the scenario"))
                request = cancel_dataset(
                    transaction,
                    float(step.get("percent", 0)),
                    reason,
                    str(step.get("cause", "operator_hold")),
                )
                state.sent.setdefault(uid, []).append(request)
                set_status = tms.n_set(uid, request)
                note = f"N-SET of the cancellation info: {_status_text(set_status)}"
                extra = Dataset()
                extra.ReasonForCancellation = reason
            self._check_own_requests(state, uid, target, expect, transaction)
            reply = tms.change_state(uid, target, transaction or "", extra)
        ok, wanted, observed = self._judge_status(expect, reply.status)
        answer = reply.dataset or Dataset()
        echoed = str(answer.get("ProcedureStepState", ""))
        items = answer.get("ProcedureStepProgressInformationSequence") or []
        progress = items[0].get("ProcedureStepProgress") if items else None
        if "reply_state" in expect:
            wanted += f", reply state {expect['reply_state']}"
            ok = ok and echoed == expect["reply_state"]
        if "reply_progress" in expect:
            wanted += f", reply progress {expect['reply_progress']}"
            ok = ok and progress is not None and float(progress) == float(expect["reply_progress"])
        observed += f", reply state {echoed or 'absent'}, progress {progress}"
        return ok, wanted, observed, note

    @staticmethod
    def _check_own_requests(
        state: _ScenarioState, uid: str, target: str, expect: dict, transaction: str | None
    ) -> None:
        """Before a final transition the suite expects to succeed, its own N-SETs must hold
        what Table CC.2.5-3 makes the performer owe; if not, the suite is at fault."""
        wanted = expect.get("status", SUCCESS)
        if target not in ups_attributes.FINAL_STATES or wanted != SUCCESS or not transaction:
            return
        missing = ups_attributes.performer_missing(state.sent.get(uid, []), target)
        if missing:
            raise SuiteError(
                f"the suite's N-SETs before {target} lack {', '.join(missing)} "
                f"({ups_attributes.reference()}); fix the scenario, not the TMS"
            )

    def _do_get_state(self, state: _ScenarioState, step: dict, expect: dict):
        ups = self._ups_of(state, step)
        with self._connection() as tms:
            # Two keys: pynetdicom's own log handler fails on a one-tag N-GET request.
            reply = tms.n_get(
                str(ups.SOPInstanceUID),
                ["ProcedureStepState", "ProcedureStepProgressInformationSequence"],
            )
        current = str((reply.dataset or Dataset()).get("ProcedureStepState", ""))
        observed = f"{_status_text(reply.status)}, state {current or 'absent'}"
        ok = reply.status == 0 and current == expect.get("state")
        return ok, f"0x0000, state {expect.get('state')}", observed, ""

    def _do_abort_during_n_set(self, state: _ScenarioState, step: dict, expect: dict):
        ups = self._ups_of(state, step)
        ds = progress_dataset(
            self.profile, self._transaction(state, step), float(step.get("percent", 0)), None
        )
        connection = self._connection()
        connection.__enter__()
        connection.abort_during_n_set(str(ups.SOPInstanceUID), ds)
        time.sleep(0.2)  # the TMS notices the abort
        return True, "N-SET cut off by A-ABORT", "aborted after the command fragment", ""

    def _do_race(self, state: _ScenarioState, step: dict, expect: dict):
        ups = self._ups_of(state, step)
        contenders = int(step.get("contenders", 2))
        connections = [self._connection(i) for i in range(contenders)]
        for connection in connections:
            connection.__enter__()
        barrier = threading.Barrier(contenders)
        statuses: list[int | None] = [None] * contenders
        empty = self.profile.performer_may_send_empty_transaction_uid

        sent_uids = ["" if empty else str(generate_uid()) for _ in range(contenders)]
        state.attempted.setdefault(step["step"], []).extend(u for u in sent_uids if u)

        def contend(i: int) -> None:
            barrier.wait()
            sent = sent_uids[i]
            try:
                reply = connections[i].change_state(str(ups.SOPInstanceUID), "IN PROGRESS", sent)
            except DimseError:
                statuses[i] = None
                return
            statuses[i] = reply.status
            given = str((reply.dataset or Dataset()).get("TransactionUID", "") or "")
            if given:  # RO-19 2008: the TMS made it; cleanup needs it
                state.attempted.setdefault(step["step"], []).append(given)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.config.query_timeout)
        for connection in connections:
            connection.__exit__(None, None, None)
        winners = sum(1 for s in statuses if s == 0)
        losers = [s for s in statuses if s != 0]
        ok = winners == int(expect.get("winners", 1)) and all(
            _status_matches(expect.get("losers_status", 0xC302), s) for s in losers
        )
        observed = f"{winners} winner(s); statuses {[_status_text(s) for s in statuses]}"
        wanted = (
            f"{expect.get('winners', 1)} winner, others "
            f"{_expect_text(expect.get('losers_status', 0xC302))}"
        )
        return ok, wanted, observed, ""

    def _do_perform_while_querying(self, state: _ScenarioState, step: dict, expect: dict):
        device = self._device(
            state, step.get("device", "tdd"), 0, time_scale=float(step.get("time_scale", 0.05))
        )
        outcomes: list[UpsOutcome] = []
        latencies: list[float] = []
        failures: list[str] = []
        with device:
            worker = threading.Thread(target=lambda: outcomes.extend(device.run_once()))
            worker.start()
            while worker.is_alive():
                t0 = time.monotonic()
                try:
                    self._query(state, device=1)
                except DimseError as exc:
                    failures.append(str(exc))
                latencies.append(time.monotonic() - t0)
                worker.join(float(step.get("every", 0.25)))
            state.collect(device, outcomes)
        ok, wanted, observed = self._outcome_checks(state, outcomes, expect)
        worst = max(latencies) if latencies else float("inf")
        limit = float(expect.get("max_query_s", 2.0))
        ok = ok and worst <= limit and not failures and len(latencies) >= 2
        observed += f"; {len(latencies)} queries during delivery, slowest {worst:.3f} s"
        if failures:
            observed += f"; failed queries: {failures[:2]}"
        return ok, f"{wanted}, {limit} s per query", observed, ""


class _ScenarioState:
    """What one scenario learned so far: its UPS by step, claims, device outcomes."""

    def __init__(self, scenario: Scenario, root: Path) -> None:
        self.scenario = scenario
        self.root = root
        self.ups: dict[str, Dataset] = {}
        self.claims: dict[tuple[str, str], str] = {}
        self.started: dict[str, dt.datetime] = {}
        self.sent: dict[str, list[Dataset]] = {}  # N-SETs sent per UPS, in order
        # Transaction UIDs of claims sent, whatever became of them (by step).
        self.attempted: dict[str, list[str]] = {}
        self.outcomes: list[UpsOutcome] = []
        self.plans: dict[str, Dataset] = {}
        self.brachy_records: dict[str, Dataset] = {}
        self.events: queue.Queue[UpsEventNotice] = queue.Queue()
        self.seen_events: list[UpsEventNotice] = []
        self.event_receiver: EventReceiver | None = None

    def close(self) -> None:
        if self.event_receiver is not None:
            self.event_receiver.stop()
            self.event_receiver = None

    def remember(self, worklist: list[Dataset]) -> None:
        for ups in worklist:
            step = actors.step_of(ups)
            if step:
                self.ups[step] = ups

    def collect(self, device: PerformingDevice, outcomes: list[UpsOutcome]) -> None:
        self.outcomes += outcomes
        store = device.receiver.store
        plan_class = device.uids["rt_plan"]
        record_class = device.uids["rt_brachy_treatment_record"]
        for instance in store:
            if instance.sop_class_uid == plan_class:
                self.plans[instance.sop_instance_uid] = store.read(instance)
            elif instance.sop_class_uid == record_class:
                self.brachy_records[instance.sop_instance_uid] = store.read(instance)

    def brachy_record_problems(self) -> list[str]:
        """RO-24/Brachy-record for every brachy record the devices stored (none is one)."""
        if not self.brachy_records:
            return ["no RT Brachy Treatment Record was stored"]
        problems = []
        for uid, record in self.brachy_records.items():
            refs = record.get("ReferencedRTPlanSequence") or []
            plan = self.plans.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
            plan_class = str(plan.SOPClassUID) if plan is not None else ""
            problems += [
                f"record {uid}: {p}" for p in brachy_record_problems(record, plan_class, plan)
            ]
        return problems

    def dwell_time_problems(self) -> list[str]:
        """Interrupted plus continued sessions give each dwell its planned time, decay-
        corrected to each session's date, within 0.1 s a channel, and never more."""
        if len(self.plans) != 1:
            return [f"{len(self.plans)} plans retrieved, cannot add the dwell times up"]
        plan = next(iter(self.plans.values()))
        records = sorted(
            self.brachy_records.values(), key=lambda r: (str(r.TreatmentDate), str(r.TreatmentTime))
        )
        problems = []
        planned = {c.channel_number: c.total_time_s for c in planned_channels(plan)}
        reference = planned_source(plan).reference_air_kerma_rate
        given: Counter = Counter()
        for record in records:
            factor = recorded_source(record).strength_at(treated_at(record)) / reference
            for channel, seconds in delivered_channel_times(record).items():
                given[channel] += seconds * factor
        for channel, seconds in sorted(planned.items()):
            if abs(given[channel] - seconds) > 0.1:
                problems.append(
                    f"channel {channel}: {given[channel]:.2f} s of the plan's {seconds:.2f} s "
                    "given over the sessions (decay-corrected)"
                )
        return problems

    def meterset_problems(self) -> list[str]:
        """Interrupted plus continued deliveries add up to the plan, and never exceed it."""
        if len(self.plans) != 1:
            return [f"{len(self.plans)} plans retrieved, cannot add the metersets up"]
        specified = specified_metersets(next(iter(self.plans.values())))
        delivered: Counter = Counter()
        for outcome in self.outcomes:
            for beam, mu in outcome.delivered.items():
                delivered[beam] += mu
        problems = []
        for beam, planned in specified.items():
            if abs(delivered[beam] - planned) > 0.01:
                problems.append(f"beam {beam}: {delivered[beam]:.2f} of {planned:.2f} MU")
        return problems


def _delivery_types(worklist: list[Dataset], profile: Profile) -> set[str]:
    items = (
        delivery_type_parameter(ups, profile)
        for ups in worklist
        if actors.step_of(ups) == "delivery"
    )
    return {str(item.get("TextValue", "")) for item in items if item is not None}
