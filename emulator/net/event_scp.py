"""The receiving side of UPS Event (PS3.4 CC.2.4): N-EVENT-REPORTs a TMS sends a subscriber.

A device's receiver and ``tdw-emu watch`` accept the UPS Event SOP Class as SCP and hand
each report, decoded, to a callback; the answer is Success whatever the callback makes of
it (CC.2.4.2: the SCU accepts every notification and decides for itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from emulator.net.ae_factory import NetworkSettings, make_ae
from emulator.net.served_ae import ServedAE

LOG = logging.getLogger("tdw.events")


@dataclass(frozen=True)
class UpsEventNotice:
    """One N-EVENT-REPORT as received."""

    event_type: int
    ups_uid: str
    info: Dataset
    from_ae: str
    to_ae: str


EventCallback = Callable[[UpsEventNotice], None]


def add_event_context(ae: AE, ups_event_uid: str) -> None:
    ae.add_supported_context(ups_event_uid)


def notice_of(event: evt.Event) -> UpsEventNotice:
    request = event.request
    try:
        info = event.event_information
    except Exception as exc:  # an undecodable report is still a report
        info = Dataset()
        info.ErrorComment = f"undecodable event information: {exc}"[:64]
    return UpsEventNotice(
        int(request.EventTypeID or 0),
        str(request.AffectedSOPInstanceUID or ""),
        info if info is not None else Dataset(),
        str(event.assoc.requestor.ae_title).strip(),
        str(event.assoc.acceptor.ae_title).strip(),
    )


def event_report_handler(deliver: Callable[[UpsEventNotice], None]):
    """An EVT_N_EVENT_REPORT handler calling ``deliver``; a failing callback is logged."""

    def handle(event: evt.Event) -> tuple[int, None]:
        notice = notice_of(event)
        try:
            deliver(notice)
        except Exception:
            LOG.exception("UPS event %d for %s not handled", notice.event_type, notice.ups_uid)
        return 0x0000, None

    return handle


class EventReceiver(ServedAE):
    """An AE that only takes UPS events (``tdw-emu watch``, a dashboard, a PPVS), from the
    callers it is given."""

    def __init__(
        self,
        ae_title: str,
        ups_event_uid: str,
        deliver: EventCallback,
        allowed_callers: list[str] | None,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: NetworkSettings | None = None,
    ) -> None:
        super().__init__()
        self.ae_title = ae_title
        self.ups_event_uid = ups_event_uid
        self.deliver = deliver
        self.allowed_callers = allowed_callers
        self.host, self.port = host, port
        self.settings = settings or NetworkSettings()

    def build(self) -> tuple[AE, list]:
        ae = make_ae(self.ae_title, self.settings, self.allowed_callers)
        add_event_context(ae, self.ups_event_uid)
        return ae, [(evt.EVT_N_EVENT_REPORT, event_report_handler(self.deliver))]

    def close_resources(self) -> None:
        """Nothing kept: every event went to ``deliver``."""
