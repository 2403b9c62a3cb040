"""Records every DIMSE message and association event the emulator's AEs send or receive.

The recorder is a set of pynetdicom event handlers passed in through
``NetworkSettings.observers``, so the exchanges it sees are exactly those on the wire:
the UPS association, C-MOVE requests and the C-STORE sub-operations arriving at the
device's receiver. The conformance rules read this log after the fact, and the reports
(traffic log, HTML timeline) are drawn from it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dsutils import decode

from emulator.net.commands import message_name

# Attributes worth a line in a summary, in this order; the rest is left to the dataset.
SUMMARY_KEYWORDS = (
    "QueryRetrieveLevel",
    "ProcedureStepState",
    "ProcedureStepLabel",
    "PatientID",
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "TransactionUID",
    "ReasonForCancellation",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "ErrorComment",
)


@dataclass
class Association:
    """One association as seen from the emulator's side."""

    number: int
    local_ae: str
    peer_ae: str
    role: str  # "requestor" or "acceptor"
    opened: float
    closed: float | None = None
    ended_by: str = ""  # "release", "abort" or "" while open
    label: str = ""


@dataclass
class Message:
    """One DIMSE message; ``dataset`` is decoded (C-STORE without its pixel data)."""

    seq: int
    time: float
    association: int
    direction: str  # "sent" or "received"
    name: str
    message_id: int | None
    responding_to: int | None
    sop_class_uid: str
    sop_instance_uid: str
    status: int | None
    action_type: int | None
    dataset: Dataset | None
    label: str = ""
    command: dict[str, str] = field(default_factory=dict)

    @property
    def is_response(self) -> bool:
        return self.name.endswith("-RSP")

    def summary(self) -> dict[str, str]:
        """A few attributes of the dataset, for the traffic log and the timeline."""
        found: dict[str, str] = {}
        if self.dataset is None:
            return found
        for keyword in SUMMARY_KEYWORDS:
            if keyword in self.dataset:
                value = self.dataset[keyword].value
                found[keyword] = str(value)[:80]
        items = self.dataset.get("ScheduledWorkitemCodeSequence") or []
        if items:
            found["ScheduledWorkitemCode"] = str(items[0].get("CodeValue", ""))
        progress = self.dataset.get("ProcedureStepProgressInformationSequence") or []
        if progress and "ProcedureStepProgress" in progress[0]:
            found["ProcedureStepProgress"] = str(progress[0].ProcedureStepProgress)
        return found

    def as_json(self, origin: float, associations: dict[int, Association]) -> dict:
        assoc = associations.get(self.association)
        return {
            "seq": self.seq,
            "t_ms": round((self.time - origin) * 1000, 3),
            "label": self.label,
            "association": self.association,
            "local_ae": assoc.local_ae if assoc else "",
            "peer_ae": assoc.peer_ae if assoc else "",
            "direction": self.direction,
            "message": self.name,
            "message_id": self.message_id,
            "responding_to": self.responding_to,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "status": None if self.status is None else f"0x{self.status:04X}",
            "action_type": self.action_type,
            "summary": self.summary(),
        }


def _transfer_syntax(event: evt.Event, context_id: int | None):
    for context in event.assoc.accepted_contexts:
        if context.context_id == context_id:
            return context.transfer_syntax[0]
    return None


class TrafficRecorder:
    """Thread-safe log of DIMSE traffic; ``label`` tags what happens from now on."""

    def __init__(self, keep_stored_objects: bool = True) -> None:
        self.keep_stored_objects = keep_stored_objects
        self.origin = time.monotonic()
        self.started = dt.datetime.now().astimezone()
        self.messages: list[Message] = []
        self.associations: dict[int, Association] = {}
        self.label = ""
        self._open: dict[int, int] = {}
        self._lock = threading.Lock()

    # -- handlers ----------------------------------------------------------------------------

    @property
    def handlers(self) -> tuple:
        return (
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_DIMSE_SENT, self._on_sent),
            (evt.EVT_DIMSE_RECV, self._on_received),
        )

    def _association(self, event: evt.Event) -> int:
        key = id(event.assoc)
        with self._lock:
            number = self._open.get(key)
            if number is None:
                number = len(self.associations) + 1
                assoc = event.assoc
                local, peer = (
                    (assoc.requestor, assoc.acceptor)
                    if assoc.is_requestor
                    else (assoc.acceptor, assoc.requestor)
                )
                self.associations[number] = Association(
                    number,
                    str(local.ae_title).strip(),
                    str(peer.ae_title).strip(),
                    "requestor" if assoc.is_requestor else "acceptor",
                    time.monotonic(),
                    label=self.label,
                )
                self._open[key] = number
            return number

    def _on_established(self, event: evt.Event) -> None:
        self._association(event)

    def _close(self, event: evt.Event, how: str) -> None:
        number = self._association(event)
        with self._lock:
            self._open.pop(id(event.assoc), None)
            record = self.associations[number]
            if record.closed is None:
                record.closed, record.ended_by = time.monotonic(), how

    def _on_released(self, event: evt.Event) -> None:
        self._close(event, "release")

    def _on_aborted(self, event: evt.Event) -> None:
        self._close(event, "abort")

    def _on_sent(self, event: evt.Event) -> None:
        self._record(event, "sent")

    def _on_received(self, event: evt.Event) -> None:
        self._record(event, "received")

    def _record(self, event: evt.Event, direction: str) -> None:
        message = event.message
        command: Dataset = message.command_set
        name = message_name(int(command.get("CommandField", 0) or 0))
        dataset = None
        raw = message.data_set.getvalue() if message.data_set is not None else b""
        if raw and (name != "C-STORE-RQ" or self.keep_stored_objects):
            syntax = _transfer_syntax(event, message.context_id)
            try:
                if syntax is not None:
                    dataset = decode(
                        BytesIO(raw),
                        syntax.is_implicit_VR,
                        syntax.is_little_endian,
                        syntax.is_deflated,
                    )
                    if name == "C-STORE-RQ" and "PixelData" in dataset:
                        del dataset.PixelData
            except Exception as exc:  # a malformed dataset is itself worth recording
                dataset = Dataset()
                dataset.ErrorComment = f"undecodable dataset: {exc}"[:64]
        status = command.get("Status")
        action = command.get("ActionTypeID")
        record = Message(
            0,
            time.monotonic(),
            self._association(event),
            direction,
            name,
            int(command.MessageID) if "MessageID" in command else None,
            int(command.MessageIDBeingRespondedTo)
            if "MessageIDBeingRespondedTo" in command
            else None,
            str(command.get("AffectedSOPClassUID") or command.get("RequestedSOPClassUID") or ""),
            str(
                command.get("AffectedSOPInstanceUID")
                or command.get("RequestedSOPInstanceUID")
                or ""
            ),
            None if status is None else int(status),
            None if action is None else int(action),
            dataset,
            self.label,
            {
                k: str(command[k].value)
                for k in (
                    "NumberOfRemainingSuboperations",
                    "NumberOfCompletedSuboperations",
                    "NumberOfFailedSuboperations",
                    "NumberOfWarningSuboperations",
                    "MoveDestination",
                    "ErrorComment",
                )
                if k in command
            },
        )
        if "EventTypeID" in command:  # N-EVENT-REPORT
            record.command["EventTypeID"] = str(int(command.EventTypeID))
        if "AttributeIdentifierList" in command:  # N-GET: which attributes were asked for
            tags = command.AttributeIdentifierList
            tags = [tags] if isinstance(tags, int) else list(tags)  # one tag, or MultiValue
            record.command["AttributeIdentifierList"] = " ".join(
                f"{int(t) >> 16:04X}{int(t) & 0xFFFF:04X}" for t in tags
            )
        with self._lock:
            record.seq = len(self.messages) + 1
            self.messages.append(record)

    # -- reading -----------------------------------------------------------------------------

    def since(self, seq: int) -> list[Message]:
        """Messages recorded after ``seq`` (0 for all), in order."""
        with self._lock:
            return [m for m in self.messages if m.seq > seq]

    def between(self, first: int, last: int) -> list[Message]:
        """Messages with ``first`` < seq <= ``last``: one scenario's share of the log."""
        return [m for m in self.since(first) if m.seq <= last]

    @property
    def last_seq(self) -> int:
        with self._lock:
            return len(self.messages)

    def exchanges(self, messages: list[Message] | None = None) -> Iterator[tuple[Message, Message]]:
        """(request, response) pairs matched on association and Message ID."""
        messages = self.since(0) if messages is None else messages
        pending: dict[tuple[int, int], Message] = {}
        for message in messages:
            if not message.is_response and message.message_id is not None:
                pending[(message.association, message.message_id)] = message
            elif message.is_response and message.responding_to is not None:
                request = pending.get((message.association, message.responding_to))
                if request is not None:
                    yield request, message

    def write_log(self, path: Path) -> Path:
        """The DIMSE traffic log: one JSON object per line, messages and association ends."""
        with self._lock:
            messages = list(self.messages)
            associations = dict(self.associations)
        lines = []
        for assoc in associations.values():
            lines.append(
                (
                    assoc.opened,
                    {
                        "t_ms": round((assoc.opened - self.origin) * 1000, 3),
                        "event": "A-ASSOCIATE",
                        "association": assoc.number,
                        "local_ae": assoc.local_ae,
                        "peer_ae": assoc.peer_ae,
                        "role": assoc.role,
                        "label": assoc.label,
                    },
                )
            )
            if assoc.closed is not None:
                lines.append(
                    (
                        assoc.closed,
                        {
                            "t_ms": round((assoc.closed - self.origin) * 1000, 3),
                            "event": "A-RELEASE" if assoc.ended_by == "release" else "A-ABORT",
                            "association": assoc.number,
                        },
                    )
                )
        for message in messages:
            lines.append((message.time, message.as_json(self.origin, associations)))
        lines.sort(key=lambda pair: pair[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as out:
            for _, line in lines:
                out.write(json.dumps(line) + "\n")
        return path
