"""``tdw-emu watch``: what a PPVS or a dashboard sees of a TMS's UPS events.

It listens as a UPS Event SCP, subscribes at the TMS (UPS Watch, globally or to one UPS),
and prints every N-EVENT-REPORT as it arrives: a table row, or one JSON object per line. It
can stop when a condition has been seen a number of times (``--until``), which lets a CI
job wait for a session to end; it unsubscribes on the way out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emulator import ups_events
from emulator.net.ae_factory import NetworkSettings
from emulator.net.event_scp import EventReceiver, UpsEventNotice
from emulator.net.peers import Peer
from emulator.net.scu import DimseError
from emulator.net.uid_registry import register_uid_set
from emulator.net.ups_scu import UpsConnection
from emulator.profile import Profile


@dataclass(frozen=True)
class Condition:
    """``key=value`` pairs an event must all match: ``event`` (name, e.g.
    ups_state_report), ``state``, ``ups`` (SOP Instance UID), ``type`` (number)."""

    wanted: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Condition:
        wanted = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("event", "state", "ups", "type"):
                raise ValueError(f"--until: {part!r} is not event=, state=, ups= or type=")
            wanted[key] = value.strip()
        return cls(wanted)

    def matches(self, row: dict) -> bool:
        return all(str(row.get(k, "")).upper() == v.upper() for k, v in self.wanted.items())


def event_row(notice: UpsEventNotice) -> dict:
    """One event as ``watch`` prints it (and as its JSON lines carry it)."""
    info = notice.info
    row = {
        "time": dt.datetime.now().isoformat(timespec="milliseconds"),
        "type": notice.event_type,
        "event": ups_events.event_name(notice.event_type).lower().replace(" ", "_"),
        "ups": notice.ups_uid,
        "from": notice.from_ae,
    }
    for keyword, key in (
        ("ProcedureStepState", "state"),
        ("InputReadinessState", "readiness"),
        ("RequestingAE", "requesting_ae"),
        ("ReasonForCancellation", "reason"),
        ("SCPStatus", "scp_status"),
        ("SubscriptionListStatus", "subscription_list"),
    ):
        if keyword in info and info[keyword].value not in (None, ""):
            row[key] = str(info[keyword].value)
    progress = info.get("ProcedureStepProgressInformationSequence") or []
    if progress and "ProcedureStepProgress" in progress[0]:
        row["progress"] = float(progress[0].ProcedureStepProgress)
    problems = ups_events.problems(notice.event_type, info)
    if problems:
        row["problems"] = problems
    return row


@dataclass
class WatchConfig:
    tms: Peer
    listen: Peer  # this watcher's AE title and the address the TMS sends events to
    profile: Profile
    network: NetworkSettings = field(default_factory=NetworkSettings)
    ups: str = ""  # one UPS; empty: a global subscription
    deletion_lock: bool = False
    until: Condition | None = None
    count: int = 1
    timeout_s: float | None = None
    listen_host: str | None = None


class Watcher:
    """Subscribes, collects events, unsubscribes; ``run`` hands each row to ``show``."""

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self._events: queue.Queue[UpsEventNotice] = queue.Queue()
        # Trial UIDs are unknown to pynetdicom: without this an event naming the UPS Push -
        # Trial class is aborted on arrival ("no supported service class").
        register_uid_set(config.profile.sop_classes)
        self.receiver = EventReceiver(
            config.listen.ae_title,
            config.profile.sop_classes["ups_event"],
            self._events.put,
            [config.tms.ae_title],
            config.listen_host or config.listen.host,
            config.listen.port,
            config.network,
        )
        self.target = config.ups or ups_events.global_instances()[0]

    def _watch(self, action: int) -> int:
        cfg = self.config
        with UpsConnection(cfg.listen.ae_title, cfg.tms, cfg.profile, cfg.network) as tms:
            return tms.watch_action(
                self.target, action, cfg.listen.ae_title, deletion_lock=cfg.deletion_lock
            )

    def run(
        self, show: Callable[[dict], None], subscribed: Callable[[str], None] | None = None
    ) -> int:
        """0 when ``until`` was met, 1 on a timeout; raises DimseError when the TMS
        refused the subscription. ``subscribed`` is told, in words, once the TMS took it."""
        self.receiver.start()
        try:
            status = self._watch(ups_events.SUBSCRIBE)
            if status & 0xF000 not in (0x0000, 0xB000):
                raise DimseError("UPS Watch subscribe refused", status)
            if subscribed is not None:
                cfg = self.config
                scope = f"UPS {cfg.ups}" if cfg.ups else "every UPS (global subscription)"
                lock = "with" if cfg.deletion_lock else "without"
                subscribed(
                    f"subscribed {cfg.listen} to {scope} at {cfg.tms}, {lock} deletion lock "
                    f"(0x{status:04X})"
                )
            return self._collect(show)
        finally:
            with contextlib.suppress(DimseError, OSError):  # the TMS went away
                self._watch(ups_events.UNSUBSCRIBE)
            self.receiver.stop()

    def _collect(self, show: Callable[[dict], None]) -> int:
        cfg = self.config
        deadline = None if cfg.timeout_s is None else time.monotonic() + cfg.timeout_s
        seen = 0
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                notice = self._events.get(timeout=wait if wait is not None else 1.0)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return 1
                continue
            row = event_row(notice)
            show(row)
            if cfg.until is not None and cfg.until.matches(row):
                seen += 1
                if seen >= cfg.count:
                    return 0


def json_line(row: dict) -> str:
    return json.dumps(row, sort_keys=False, default=str)
