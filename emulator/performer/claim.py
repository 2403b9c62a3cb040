"""One UPS a device holds IN PROGRESS, from its claim to the final state the TMS accepts.

The claim is a ``transitions`` machine whose every state change is journaled, so a claim
made in this process and one resumed from the journal after a kill are the same object
running the same code::

    claiming -> claimed -> performing -> results_stored -> final_update_sent -> completed
                                \\______________\\_________________\\____ -> canceled
                                                                     \\-> final_pending

``claiming`` is journaled before the N-ACTION IN PROGRESS leaves, with the Transaction UID
this device made for it: a process killed between the TMS accepting the claim and the
journal hearing of it still knows the UPS and the UID to end it with (a UPS is never left
IN PROGRESS by a crash).

``end_as`` records the final state aimed at (COMPLETED, or CANCELED with a reason and a
CID 9300 cause) from any open state. ``final_pending`` means the TMS refused the final
transition or could not be reached; the claim stays open in the journal and is driven to
its end again later, in this process and after a restart.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from transitions import Machine

from emulator.performer.outbox import Claim, ClaimJournal
from emulator.performer.progress import ProgressReporter

OPEN_STATES = [
    "claiming",
    "claimed",
    "performing",
    "results_stored",
    "final_update_sent",
    "final_pending",
]
STATES = [*OPEN_STATES, "completed", "canceled", "not_claimed"]
TRANSITIONS = [
    {"trigger": "accepted", "source": "claiming", "dest": "claimed"},
    {"trigger": "not_ours", "source": "claiming", "dest": "not_claimed"},
    {"trigger": "begin", "source": "claimed", "dest": "performing"},
    {"trigger": "results_kept", "source": ["claimed", "performing"], "dest": "results_stored"},
    {
        "trigger": "final_update_sent",
        "source": ["claimed", "performing", "results_stored", "final_pending"],
        "dest": "final_update_sent",
    },
    {"trigger": "accepted_completed", "source": "final_update_sent", "dest": "completed"},
    {"trigger": "accepted_canceled", "source": "final_update_sent", "dest": "canceled"},
    {"trigger": "refused", "source": OPEN_STATES[1:], "dest": "final_pending"},
]


@dataclass
class ClaimedUps:
    """The claim's state and everything its remaining exchanges need."""

    record: Claim
    journal: ClaimJournal
    ups: Dataset = field(default_factory=Dataset)  # at least the Scheduled Workitem code
    stored: list[Dataset] = field(default_factory=list)  # results the Archive holds
    state: str = "claimed"
    # RO-26 for this claim while it is performed (emulator/performer/progress.py), and what
    # its last report says beside the share (a flag the TMS console shows).
    reporter: ProgressReporter | None = field(default=None, compare=False, repr=False)
    description: str = ""

    def __post_init__(self) -> None:
        self.state = self.record.state if self.record.state in STATES else "claimed"
        Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial=self.state,
            after_state_change="_journal",
            auto_transitions=False,
        )

    @classmethod
    def intended(
        cls,
        journal: ClaimJournal,
        ups: Dataset,
        step: str,
        transaction_uid: str,
        started: dt.datetime,
    ) -> ClaimedUps:
        """A claim about to be sent; journaled before the N-ACTION leaves the device."""
        record = Claim(
            str(ups.SOPInstanceUID),
            transaction_uid,
            step,
            "claiming",
            0.0,
            started.strftime("%Y%m%d%H%M%S"),
        )
        journal.save(record)
        return cls(record, journal, ups)

    # -- what the claim knows ----------------------------------------------------------------

    @property
    def uid(self) -> str:
        return self.record.ups_uid

    @property
    def transaction_uid(self) -> str:
        return self.record.transaction_uid

    @property
    def step(self) -> str:
        return self.record.step

    @property
    def started(self) -> dt.datetime:
        return dt.datetime.strptime(self.record.started, "%Y%m%d%H%M%S")

    @property
    def target(self) -> str:
        return self.record.target or "COMPLETED"

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def progressed(self, percent: float) -> None:
        self.record.progress = percent
        self.journal.progress(self.uid, percent)

    def end_as(
        self, target: str, reason: str = "", cause: str = "", percent: float = 100.0
    ) -> None:
        """Records the final state aimed at; the exchanges that reach it come next."""
        self.record.target, self.record.reason, self.record.cause = target, reason, cause
        self.record.progress = percent
        self.journal.save(self.record)

    def defer(self) -> None:
        """The final transition did not happen yet: journaled as pending, retried later."""
        self.refused()

    def _journal(self) -> None:
        self.record.state = self.state
        self.journal.save(self.record)
        if self.state in ("completed", "canceled", "not_claimed"):
            self.journal.ended(self.uid, self.state)
