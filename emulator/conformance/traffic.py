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

PENDING_RESPONSES = ("C-FIND-RSP", "C-GET-RSP", "C-MOVE-RSP")
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
    aborted_here: bool = False  # this side sent the A-ABORT (a step cut it off, a timeout)


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
    # The abstract syntax of the presentation context it travelled on (a UPS request names
    # UPS Push whatever the context, PS3.4 CC.3.1).
    context_uid: str = ""

    @property
    def is_response(self) -> bool:
        return self.name.endswith("-RSP")

    @property
    def is_pending(self) -> bool:
        """A pending response of a C-FIND, C-GET or C-MOVE: more follow. (FF00 answering
        an N-SET is a final, if undefined, status.)"""
        return self.status in (0xFF00, 0xFF01) and self.name in PENDING_RESPONSES

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
        # RO-26: the Referenced Beam Number in Progress (a processing parameter of the
        # performed procedure), as "code=value".
        performed = self.dataset.get("UnifiedProcedureStepPerformedProcedureSequence") or []
        parameters = performed[0].get("PerformedProcessingParametersSequence") if performed else []
        values = [
            f"{item.ConceptNameCodeSequence[0].CodeValue}={item.get('TextValue', '')}"
            for item in parameters or []
            if item.get("ConceptNameCodeSequence")
        ]
        if values:
            found["PerformedProcessingParameters"] = ", ".join(values)
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
            "error_comment": self.command.get("ErrorComment", ""),
            "action_type": self.action_type,
            "context_uid": self.context_uid,
            "summary": self.summary(),
        }


def _context(event: evt.Event, context_id: int | None):
    for context in event.assoc.accepted_contexts:
        if context.context_id == context_id:
            return context
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
        # pynetdicom marks an association it sent the A-ABORT on (3.0: _sent_abort).
        if getattr(event.assoc, "_sent_abort", False):
            self.associations[self._association(event)].aborted_here = True
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
        context = _context(event, message.context_id)
        raw = message.data_set.getvalue() if message.data_set is not None else b""
        if raw and (name != "C-STORE-RQ" or self.keep_stored_objects):
            syntax = context.transfer_syntax[0] if context is not None else None
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
        record.context_uid = str(context.abstract_syntax) if context is not None else ""
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

    def requests(
        self, messages: list[Message] | None = None
    ) -> Iterator[tuple[Message, Message | None]]:
        """Every request with its final response, or None when none was recorded (the peer
        never answered within the exchange timeout, or the association ended first); in
        the order the requests were made. A C-FIND or C-MOVE yields its final response."""
        messages = self.since(0) if messages is None else messages
        waiting: dict[tuple[int, int], Message] = {}
        answered: dict[int, Message] = {}  # request seq -> its final response
        for message in messages:
            if not message.is_response and message.message_id is not None:
                waiting[(message.association, message.message_id)] = message
            elif message.is_response and message.responding_to is not None:
                key = (message.association, message.responding_to)
                if not message.is_pending and key in waiting:
                    answered[waiting.pop(key).seq] = message
        for message in messages:
            if not message.is_response and message.message_id is not None:
                yield message, answered.get(message.seq)

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
