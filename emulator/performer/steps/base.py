"""What every step of a session shares: one small interface, the context it works in, and
the way it gives up.

A step kind (positioning acquisition, registration, adjustment, beam delivery, dwell
delivery) owns its input checks, its work on the machine, its results and its progress;
:class:`~emulator.performer.workflow.PerformingDevice` owns only the UPS around it (query,
claim, progress reports, final update, complete or cancel). A device kind is the list of
steps it performs (emulator/performer/kinds.py), so adding a machine family adds a step
class, never a branch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydicom.dataset import Dataset

from devices.base import Machine, role
from emulator.ups_references import InstanceReference

if TYPE_CHECKING:
    from emulator.metrics import ActorMetrics
    from emulator.performer.cancel_requests import CancelRequests
    from emulator.performer.claim import ClaimedUps
    from emulator.performer.outbox import Claim, ClaimJournal
    from emulator.performer.steps.session_state import SessionState
    from emulator.performer.workflow import UpsOutcome
    from emulator.profile import SopClasses
    from emulator.store import ObjectStore


class Cancel(Exception):
    """The work was abandoned after the claim; the UPS must be CANCELED with this reason.

    ``cause`` names the row of ``profiles/discontinuation_reasons.yaml`` that codes it;
    ``stored`` is what was stored before (the record of what was delivered), ``percent``
    the progress actually reached.
    """

    def __init__(
        self,
        reason: str,
        percent: float = 0.0,
        stored: list[Dataset] | None = None,
        cause: str = "device_error",
    ):
        super().__init__(reason)
        self.reason = reason
        self.percent = percent
        self.stored = stored or []
        self.cause = cause


@dataclass
class StepInputs:
    """What a UPS's inputs gave the device: every object held, and what the step picked
    out of them (the plan, a delivery instruction, earlier records)."""

    held: dict[str, Dataset] = field(default_factory=dict)
    plan: Dataset | None = None
    instruction: Dataset | None = None
    previous_records: list[Dataset] = field(default_factory=list)
    # What the step prepared from them for the machine (an afterloader's channel tasks).
    tasks: list = field(default_factory=list)


@dataclass
class StepContext:
    """What the performing device lends a step: its machine, its identity and stores, and
    the UPS services a step calls while it works (storing results, reporting progress)."""

    machine: Machine
    uids: SopClasses
    station: str
    metrics: ActorMetrics
    journal: ClaimJournal
    store: ObjectStore
    cancel_requests: CancelRequests
    # store_results(objects, transaction, ups_uid, percent) -> what was stored, or Cancel
    store_results: Callable[[list[Dataset], str, str, float], list[Dataset]]
    # progress(claim, percent, marker, description): RO-26 now, refused -> Cancel
    progress: Callable[..., None]
    # Hooks for a watcher (a demo's bars, a test): every machine event, each unit's start.
    on_event: Callable[[Any, Any], None] | None = None
    on_unit_start: Callable[[Any], None] | None = None


@dataclass
class Work:
    """One claimed UPS a step performs: the claim, its inputs, the session state, and the
    outcome it fills (delivered amounts, flags)."""

    claim: ClaimedUps
    inputs: StepInputs
    session: SessionState
    outcome: UpsOutcome


class Step(ABC):
    """One kind of session step.

    ``name`` is the session step of the worklist it performs (profiles/workitems.yaml);
    ``role`` the machine role it needs (devices/base.py, devices/afterloader.py).
    """

    name: ClassVar[str]
    role: ClassVar[type]
    # The inputs its UPS must name, one each (RO-17 Response-4): (SOP class key in
    # profiles/sop_classes.yaml, its name for the refusal).
    required_inputs: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, context: StepContext) -> None:
        self.context = context

    @property
    def machine(self) -> Any:
        """The machine in the role this step needs (DeviceError if it lacks it)."""
        return role(self.context.machine, self.role)

    def input_problems(self, ups: Dataset, refs: list[InstanceReference]) -> list[str]:
        """What the UPS's Input Information Sequence lacks for this step, before anything
        is retrieved."""
        classes = [r.sop_class_uid for r in refs]
        return [
            f"RO-17/Response-4: {self.name} needs exactly one {label} input"
            for key, label in self.required_inputs
            if classes.count(self.context.uids[key]) != 1
        ]

    def read_inputs(self, ups: Dataset, inputs: StepInputs, session: SessionState) -> list[str]:
        """Picks what the step needs out of the retrieved inputs and checks it against the
        machine; each problem is a sentence, and any problem forbids the claim."""
        return []

    def start_marker(self, inputs: StepInputs) -> int | None:
        """What the first RO-26 report names as in progress (a beam number), if anything."""
        return None

    @abstractmethod
    def perform(self, work: Work) -> float:
        """Does the step on the machine and stores its results; returns the progress
        reached (100 when done). Raises :class:`Cancel` to end the UPS CANCELED."""

    def after_restart(self, claim: Claim, outcome: UpsOutcome) -> Cancel | None:
        """A process died while performing this step: the Cancel that stores what the
        journal shows was done (a delivery's record), or None when nothing was."""
        return None
