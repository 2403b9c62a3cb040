"""The performer's exchanges with the TMS: one association per burst of exchanges, retried.

A real device does not hold its TMS association through a 60 s CBCT or a beam: the TMS's
idle timeout would drop it, and a fleet of devices would hold the TMS's association slots.
Nor does it open one per request of a burst (claim, progress, final N-SET, COMPLETED).
Each exchange here borrows the association the last one left open
(emulator/net/association_hold.py), which is released ``association_hold_s`` after its
last use; an exchange that fails on a held association the TMS has meanwhile dropped is
sent again at once on a new one (counted as a retry, for the rules below). When the TMS
cannot be reached (refused connection, aborted association, no response), the exchange is
retried with jittered exponential backoff until ``window_s`` has passed; then
:class:`TmsUnavailable` says so. A failure *status* is an answer, never retried here: the
caller decides what it means.

Two requests are not idempotent, and a retry after a lost response must not misread its
own earlier success: a COMPLETED or CANCELED retried onto a UPS that already reached it
gets the state table's warning (B306, B304), which :meth:`TmsLink.change_state` reports as
success when it was a retry; a claim retried with the same Transaction UID gets C302, and
an N-SET with that UID then shows whether the first claim succeeded.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from pydicom.dataset import Dataset

from emulator import ups_events
from emulator.net.ae_factory import NetworkSettings
from emulator.net.association_hold import AssociationHold
from emulator.net.peers import Peer
from emulator.net.scu import DimseError
from emulator.net.ups_scu import Reply, UpsConnection
from emulator.profile import Profile

LOG = logging.getLogger("tdw.device.tms")
T = TypeVar("T")
ALREADY_FINAL = {"COMPLETED": 0xB306, "CANCELED": 0xB304}


# RO-19 2008 (3.19.4.1.2): the TMS makes the Transaction UID and sends it only in the claim's
# reply. When that reply is lost and the retry finds the UPS IN PROGRESS, the device cannot
# tell whether it is its own claim, nor end it.
LOST_2008_CLAIM = (
    "the claim's reply was lost and the TMS now has the UPS IN PROGRESS, perhaps by this "
    "device's claim; under RO-19 2008 the Transaction UID comes only in that reply, so "
    "this device cannot end it: the TMS must"
)


class TmsUnavailable(DimseError):
    """The TMS could not be reached within the retry window."""


@dataclass(frozen=True)
class Backoff:
    """How long to keep trying an exchange, and how fast to back off."""

    window_s: float = 120.0
    first_delay_s: float = 0.25
    max_delay_s: float = 10.0

    def pauses(self, rng: random.Random) -> Iterator[float]:
        """Pause after pause, with jitter: each between half and all of a ceiling that
        doubles from ``first_delay_s`` up to ``max_delay_s``; without end."""
        ceiling = self.first_delay_s
        while True:
            yield rng.uniform(ceiling / 2, ceiling)
            ceiling = min(ceiling * 2, self.max_delay_s)

    def delays(self, rng: random.Random) -> list[float]:
        """Pauses before each retry, with full jitter, adding up to at most the window."""
        out, total = [], 0.0
        for pause in self.pauses(rng):
            if total + pause > self.window_s:
                return out
            out.append(pause)
            total += pause
        return out


class TmsLink:
    """Every UPS exchange a performer has with one TMS."""

    def __init__(
        self,
        calling_ae: str,
        tms: Peer,
        profile: Profile,
        settings: NetworkSettings,
        backoff: Backoff | None = None,
    ) -> None:
        self.calling_ae = calling_ae
        self.tms = tms
        self.profile = profile
        self.settings = settings
        self.backoff = backoff or Backoff()
        self._rng = random.Random()
        self.retries = 0  # exchanges repeated because the TMS could not be reached
        self._hold: AssociationHold[UpsConnection] = AssociationHold(
            lambda: UpsConnection(
                self.calling_ae, self.tms, self.profile, self.settings
            ).__enter__(),
            settings.association_hold_s,
        )

    @property
    def associations_opened(self) -> int:
        return self._hold.opened

    def close(self) -> None:
        """Releases the held association (the device stops)."""
        self._hold.close()

    def release_held(self) -> None:
        """Releases the held association now (a burst is known to be over); the next
        exchange opens a new one."""
        self._hold.release_held()

    def _exchange(self, what: str, send: Callable[[UpsConnection], T], patient: bool = True) -> T:
        """``send`` on the held or a new association; retried while the TMS cannot be reached.

        ``patient=False`` tries twice only: for a progress report, which must not hold a
        beam or the next step back while a TMS restarts.
        """
        delays = self.backoff.delays(self._rng) if patient else [self.backoff.first_delay_s]
        attempt = 0
        stale_retried = False
        while True:
            reused = False
            try:
                with self._hold.connection() as (connection, reused):
                    return send(connection)
            except DimseError as exc:
                if exc.status is not None or getattr(exc, "permanent", False):
                    raise  # an answer (a status, a permanent rejection), not an outage
                if reused and not stale_retried:
                    # The held association died while held (the TMS's idle timeout, a
                    # restart): once, at once, on a new one.
                    LOG.info("%s: the held association failed (%s); sending again", what, exc)
                    stale_retried = True
                    self.retries += 1
                    continue
                if attempt >= len(delays):
                    raise TmsUnavailable(
                        f"{what}: the TMS {self.tms} could not be reached "
                        f"({exc}); gave up after {attempt + 1} attempt(s)"
                    ) from exc
                LOG.warning("%s: %s; retrying in %.1f s", what, exc, delays[attempt])
                time.sleep(delays[attempt])
                attempt += 1
                self.retries += 1

    def find(self, identifier: Dataset) -> list[Dataset]:
        return self._exchange("RO-17 worklist query", lambda c: c.find(identifier))

    def n_set(self, uid: str, modifications: Dataset, patient: bool = True) -> int:
        return self._exchange(f"N-SET {uid}", lambda c: c.n_set(uid, modifications), patient)

    def n_get(self, uid: str, keywords: list[str]) -> Reply:
        return self._exchange(f"N-GET {uid}", lambda c: c.n_get(uid, keywords))

    def watch(self, uid: str, subscribe: bool, receiving_ae: str) -> int:
        """Subscribes ``receiving_ae`` to a UPS's events, or unsubscribes it (CC.2.3)."""
        action = ups_events.SUBSCRIBE if subscribe else ups_events.UNSUBSCRIBE
        return self._exchange(
            f"UPS Watch {'subscribe' if subscribe else 'unsubscribe'} {uid}",
            lambda c: c.watch_action(uid, action, receiving_ae),
            patient=False,
        )

    def claim(self, uid: str, transaction_uid: str, probe: Dataset) -> Reply:
        """RO-19 N-ACTION IN PROGRESS. If the TMS had to be reached again and answers C302,
        ``probe`` (an N-SET carrying ``transaction_uid``) tells whether the lost first
        attempt was the one that claimed it."""
        before = self.retries
        reply = self._exchange(
            f"N-ACTION IN PROGRESS {uid}",
            lambda c: c.change_state(uid, "IN PROGRESS", transaction_uid),
        )
        lost_reply = reply.status == 0xC302 and self.retries > before
        if lost_reply and not transaction_uid:
            return Reply(reply.status, reply.dataset, LOST_2008_CLAIM)
        if lost_reply and self.n_set(uid, probe) == 0x0000:
            LOG.warning("UPS %s: the claim whose reply was lost had succeeded", uid)
            return Reply(0x0000, None)
        return reply

    def change_state(
        self, uid: str, state: str, transaction_uid: str, extra: Dataset | None = None
    ) -> Reply:
        """RO-25 N-ACTION COMPLETED or CANCELED; a retry answered with the state table's
        "already in that state" warning is the earlier attempt's success."""
        before = self.retries
        reply = self._exchange(
            f"N-ACTION {state} {uid}",
            lambda c: c.change_state(uid, state, transaction_uid, extra),
        )
        if self.retries > before and reply.status == ALREADY_FINAL.get(state):
            return Reply(0x0000, reply.dataset)
        return reply
