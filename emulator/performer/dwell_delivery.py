"""Channel-by-channel, dwell-by-dwell delivery on an afterloader, as a ``transitions`` state
machine (the table is data, as for beams in delivery.py): a channel is loaded, its source
sent out, and it ends done or interrupted; an interrupted channel ends the session, so the
TMS schedules exactly the rest. What was delivered is taken only from the machine's
events, dwell by dwell.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from transitions import Machine

from devices.afterloader import (
    Afterloader,
    ChannelEnded,
    ChannelProgramme,
    ChannelTick,
    DwellDone,
)
from devices.base import DeviceError, Termination
from emulator.results.brachy_record import DeliveredChannel, DeliveredDwell
from emulator.synth.brachy_access import PlannedChannel

STATES = ["idle", "channel_ready", "source_out", "channel_done", "interrupted", "session_done"]
TRANSITIONS = [
    {"trigger": "load", "source": ["idle", "channel_done"], "dest": "channel_ready"},
    {"trigger": "send_out", "source": "channel_ready", "dest": "source_out"},
    {"trigger": "complete", "source": "source_out", "dest": "channel_done"},
    {"trigger": "halt", "source": "source_out", "dest": "interrupted"},
    {"trigger": "finish", "source": ["idle", "channel_done"], "dest": "session_done"},
    {
        "trigger": "abandon",
        "source": ["idle", "channel_ready", "channel_done", "interrupted"],
        "dest": "session_done",
    },
]


@dataclass(frozen=True)
class ChannelTask:
    """One channel to treat in this session: the plan's channel and today's programme."""

    planned: PlannedChannel
    programme: ChannelProgramme

    def fault_window(self) -> tuple[int, float, float]:
        """(channel, 0, its source seconds): where a door interlock may be armed."""
        return self.programme.channel, 0.0, self.programme.total_s


@dataclass
class DwellOutcome:
    channels: list[DeliveredChannel] = field(default_factory=list)
    interrupted: bool = False
    reason: str = ""
    termination: str = "NORMAL"
    code: str = ""
    device_error: bool = False  # refused before the source went out: nothing delivered

    @property
    def delivered_s(self) -> float:
        return round(sum(c.delivered_s for c in self.channels), 4)


class _ChannelInProgress:
    """What the machine has reported of the channel being treated."""

    def __init__(self, task: ChannelTask) -> None:
        self.task = task
        self.done: list[DeliveredDwell] = []
        self.delivered_s = 0.0  # source seconds at dwell positions, as the machine counts

    def dwell_done(self, event: DwellDone) -> None:
        planned = {d.index: d for d in self.task.planned.dwells}[event.index]
        specified = {d.index: d.time_s for d in self.task.programme.dwells}[event.index]
        self.done.append(
            DeliveredDwell(
                event.index,
                planned.control_point_index,
                event.position_mm,
                specified,
                event.delivered_s,
                dt.datetime.now(),
            )
        )
        self.delivered_s = round(sum(d.delivered_s for d in self.done), 4)

    def as_delivered(self, ended: ChannelEnded | None = None) -> DeliveredChannel:
        """The channel as measured: each dwell done, and the one it stopped in with the
        seconds the machine counted there (its total less the dwells done)."""
        dwells = list(self.done)
        total = ended.delivered_s if ended is not None else self.delivered_s
        rest = round(total - sum(d.delivered_s for d in dwells), 4)
        if rest > 1e-6:
            index = ended.dwell if ended is not None and ended.dwell is not None else None
            if index is None:  # not said: the next dwell after those done
                index = next(
                    (d.index for d in self.task.programme.dwells
                     if d.index not in {x.index for x in dwells}),
                    dwells[-1].index if dwells else 0,
                )  # fmt: skip
            for_index = [d for d in dwells if d.index == index]
            if for_index:  # the source stayed at a dwell it had finished (it would not retract)
                old = for_index[0]
                dwells[dwells.index(old)] = DeliveredDwell(
                    old.index, old.control_point_index, old.position_mm, old.specified_s,
                    round(old.delivered_s + rest, 4), old.moment,
                )  # fmt: skip
            else:
                planned = {d.index: d for d in self.task.planned.dwells}[index]
                specified = {d.index: d.time_s for d in self.task.programme.dwells}[index]
                dwells.append(
                    DeliveredDwell(
                        index,
                        planned.control_point_index,
                        planned.position_mm,
                        specified,
                        rest,
                        dt.datetime.now(),
                    )
                )
        termination = ended.termination.value if ended is not None else "UNKNOWN"
        return DeliveredChannel(
            self.task.programme.channel,
            self.task.programme.length_mm,
            self.task.programme.total_s,
            dwells,
            termination,
            ended.code if ended is not None else "",
            ended.reason if ended is not None else "",
        )


class ChannelDelivery:
    """Treats channel tasks on one afterloader; ``on_event`` sees every event, ``on_start``
    each channel as it begins, ``on_delivered`` every new count (so the caller journals
    :meth:`so_far` and a killed process can record what was given)."""

    def __init__(
        self,
        machine: Afterloader,
        tasks: list[ChannelTask],
        on_event: Callable[[ChannelTask, object], None] | None = None,
        on_start: Callable[[ChannelTask], None] | None = None,
        on_delivered: Callable[[ChannelDelivery], None] | None = None,
    ) -> None:
        self.afterloader = machine
        self.tasks = tasks
        self.on_event = on_event or (lambda task, event: None)
        self.on_start = on_start or (lambda task: None)
        self.on_delivered = on_delivered or (lambda delivery: None)
        self.outcome = DwellOutcome()
        self._current: _ChannelInProgress | None = None
        self.machine = Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="idle",
            auto_transitions=False,
        )

    def so_far(self) -> list[DeliveredChannel]:
        """Every channel treated so far; the one in progress ends UNKNOWN where it stands."""
        current = [self._current.as_delivered()] if self._current else []
        return self.outcome.channels + current

    def run(self) -> DwellOutcome:
        outcome = self.outcome
        for task in self.tasks:
            try:
                self.afterloader.load_channel(task.programme)
            except DeviceError as exc:
                outcome.interrupted = outcome.device_error = True
                outcome.termination = Termination.MACHINE.value
                outcome.reason = f"channel {task.programme.channel} refused: {exc}"
                self.abandon()
                return outcome
            self.load()
            self.on_start(task)
            self.send_out()
            channel = self._treat(task)
            outcome.channels.append(channel)
            self._current = None
            self.on_delivered(self)
            if channel.termination != Termination.NORMAL.value:
                self.halt()
                outcome.interrupted = True
                outcome.termination = channel.termination
                outcome.code = channel.termination_code
                outcome.reason = f"channel {task.programme.channel}: " + (
                    f"{channel.termination_description} ({channel.termination_code})"
                    if channel.termination_code
                    else channel.termination_description
                )
                self.abandon()
                return outcome
            self.complete()
        self.finish()
        return outcome

    def _treat(self, task: ChannelTask) -> DeliveredChannel:
        current = self._current = _ChannelInProgress(task)
        for event in self.afterloader.treat():
            self.on_event(task, event)
            if isinstance(event, ChannelTick):
                current.delivered_s = max(current.delivered_s, event.delivered_s)
            elif isinstance(event, DwellDone):
                current.dwell_done(event)
            elif isinstance(event, ChannelEnded):
                return current.as_delivered(event)
            self.on_delivered(self)
        raise RuntimeError("the afterloader ended treat() without ChannelEnded")
