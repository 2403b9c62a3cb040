"""Delivers the N-EVENT-REPORTs the reference TMS owes its UPS subscribers (PS3.4 CC.2.4).

One thread reads the durable event log (``UpsWatch``), oldest first, and hands each
subscriber's events, in order, to a sender thread of that subscriber's own, which sends
them over one association (UPS Event SOP Class, Affected SOP Class UPS Push, as for every
UPS instance): a subscriber that accepts and never answers delays only itself. A
subscriber that cannot be reached keeps its events: they are tried again with a doubling
pause, and events for one AE are never sent out of order. Delivery is at least once: an
event whose response was lost is sent again.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable

from pynetdicom.presentation import build_context

from emulator import ups_events
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.net.scu import DimseError, associate
from emulator.profile import SopClasses
from emulator.reference.ups_watch import OwedEvent, UpsWatch

LOG = logging.getLogger("tdw.tms.events")
IDLE_POLL_S = 1.0  # a retry that falls due is noticed within this
MAX_RETRY_S = 30.0
MAX_SENDERS = 16  # subscribers being sent to at once
EVENT_DIMSE_TIMEOUT_S = 10.0


class EventDispatcher:
    def __init__(
        self,
        watch: UpsWatch,
        ae_title: str,
        peers: Callable[[str], Peer | None],
        sop_classes: SopClasses,
        settings: NetworkSettings,
        on_sent: Callable[[int, bool], None] | None = None,
        on_owed: Callable[[int], None] | None = None,
    ) -> None:
        self.watch = watch
        self.ae_title = ae_title
        self.peers = peers
        self.sop_classes = sop_classes
        # Told (event type, delivered) after each attempt: the TMS's metrics.
        self.on_sent = on_sent or (lambda event_type, ok: None)
        # Told after each round how many events are still owed (a gauge).
        self.on_owed = on_owed or (lambda count: None)
        # A subscriber that never answers must not hold the TMS's other subscribers up
        # for pynetdicom's default minute per message.
        self.settings = dataclasses.replace(
            settings, dimse_timeout=min(settings.dimse_timeout, EVENT_DIMSE_TIMEOUT_S)
        )
        self._senders: dict[str, threading.Thread] = {}
        self._senders_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rng = random.Random()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts delivering (again, after a stop: the TMS's outage ended)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tms-events", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, drain_s: float = 2.0) -> None:
        """Stops after a last round (what is still owed stays owed, for the next start)."""
        self._wake.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_s + 5.0)
        self.join_senders(drain_s)

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._wake.clear()
            try:
                self.deliver_due()
                self.on_owed(self.watch.owed_count())
            except Exception:  # the log is intact; try again next round
                LOG.exception("event delivery round failed")
            if stopping:
                return
            self._wake.wait(IDLE_POLL_S)

    def deliver_due(self) -> int:
        """One round: the due events of each subscriber, in order, each subscriber on a
        delivery thread of its own (at most ``MAX_SENDERS`` at once), so one that accepts
        an association and never answers holds up nobody but itself. Returns how many
        subscribers got a sender this round."""
        by_ae: dict[str, list[OwedEvent]] = {}
        for event in self.watch.due():
            by_ae.setdefault(event.ae_title, []).append(event)
        started = 0
        for ae_title, events in by_ae.items():
            with self._senders_lock:
                if ae_title in self._senders or len(self._senders) >= MAX_SENDERS:
                    continue  # busy with its earlier events, or no slot: next round
                sender = threading.Thread(
                    target=self._send, args=(ae_title, events), name=f"tms-events-{ae_title}"
                )
                self._senders[ae_title] = sender
            sender.start()
            started += 1
        return started

    def _send(self, ae_title: str, events: list[OwedEvent]) -> None:
        try:
            self._deliver(ae_title, events)
        except Exception:  # the events stay owed
            LOG.exception("events for %s not delivered", ae_title)
        finally:
            with self._senders_lock:
                self._senders.pop(ae_title, None)
            self._wake.set()  # what came meanwhile for this AE is due now

    def join_senders(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._senders_lock:
                senders = list(self._senders.values())
            if not senders or time.monotonic() >= deadline:
                return
            senders[0].join(max(deadline - time.monotonic(), 0.0))

    def _deliver(self, ae_title: str, events: list[OwedEvent]) -> int:
        peer = self.peers(ae_title)
        if peer is None:
            self._retry(events, f"{ae_title} is not a configured peer")
            return 0
        contexts = [build_context(self.sop_classes["ups_event"])]
        sent = 0
        try:
            with associate(self.ae_title, peer, contexts, self.settings) as assoc:
                for event in events:
                    status, _ = assoc.send_n_event_report(
                        event.dataset,
                        event.event_type,
                        self.sop_classes["ups_push"],
                        event.ups_uid,
                    )
                    code = int(status.Status) if status is not None and "Status" in status else None
                    if code is None:
                        raise DimseError("N-EVENT-REPORT: no response")
                    # Any answer means the subscriber has it; a failure status is its own
                    # business (CC.2.4.2), and sending again would not change it.
                    self.watch.delivered(event.id)
                    self.on_sent(event.event_type, True)
                    sent += 1
                    LOG.info(
                        "%s to %s for %s: 0x%04X",
                        ups_events.event_name(event.event_type),
                        ae_title,
                        event.ups_uid,
                        code,
                    )
        except (DimseError, OSError, RuntimeError) as exc:
            self._retry(events[sent:], str(exc))
        return sent

    def _retry(self, events: list[OwedEvent], error: str) -> None:
        for event in events:
            pause = min(MAX_RETRY_S, 0.5 * 2 ** min(event.attempts, 6))
            self.watch.failed(event.id, error, self._rng.uniform(pause / 2, pause))
            self.on_sent(event.event_type, False)
        if events:
            LOG.warning(
                "%d event(s) for %s kept for a retry: %s", len(events), events[0].ae_title, error
            )
