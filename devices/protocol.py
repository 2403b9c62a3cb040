"""Wire protocol v2 between the emulator and a treatment-machine controller (hil/PROTOCOL.md).

A frame is COBS-encoded and ends with a zero byte, so a receiver can always find the next
frame after garbage. Inside: version, message type, sequence number, body length, a JSON
body, and a CRC-16/CCITT-FALSE over everything before it. The CRC catches any corruption
within 16 bits; the length and COBS's own structure catch a corrupted COBS code byte,
which would otherwise move a zero far away. A frame that fails any check is rejected
whole; it is never half-read.
"""

from __future__ import annotations

import binascii
import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from cobs import cobs

VERSION = 1  # the framing version (the frame layout), unchanged since protocol 1
PROTOCOL_VERSION = 2  # agreed in HELLO / HELLO_REPLY (hil/PROTOCOL.md, Versioning)
DELIMITER = b"\x00"
HEADER = struct.Struct(">BBHI")  # version, type, sequence, body length
MAX_BODY = 1 << 20  # 1 MiB: larger frames are refused before decoding


class MessageType(enum.IntEnum):
    HELLO = 0x01
    LOAD_BEAM = 0x02
    BEAM_ON = 0x03
    INTERRUPT = 0x04
    MOVE_COUCH = 0x05
    ACQUIRE = 0x06
    GET_STATE = 0x07
    HEARTBEAT = 0x10
    # The afterloader's requests (hil/PROTOCOL.md, Afterloader): sent only to a controller
    # whose HELLO_REPLY says ``"machine": "afterloader"``.
    GET_SOURCE_STATUS = 0x20
    LOAD_CHANNEL = 0x21
    TREAT = 0x22
    RETRACT = 0x23
    HELLO_REPLY = 0x81
    LOADED = 0x82
    BEAM_STARTED = 0x83
    COUCH_POSITION = 0x85
    IMAGES = 0x86
    HEARTBEAT_REPLY = 0x90
    METERSET = 0xA0
    CONTROL_POINT = 0xA1
    BEAM_ENDED = 0xA2
    STATE = 0xA3
    PROGRESS = 0xA4
    SOURCE_STATUS = 0xB0
    CHANNEL_STARTED = 0xB2
    DWELL_PROGRESS = 0xC0
    DWELL_DONE = 0xC1
    CHANNEL_ENDED = 0xC2
    DOOR = 0xC3
    ACK = 0xF0
    NAK = 0xF1
    ERROR = 0xFE


class FrameError(ValueError):
    """A frame that cannot be trusted: bad COBS, CRC, version, type, length or JSON."""


@dataclass(frozen=True)
class Frame:
    type: MessageType
    seq: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def is_link_control(self) -> bool:
        """ACK and NAK are not themselves acknowledged."""
        return self.type in (MessageType.ACK, MessageType.NAK)


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF), as binascii computes it."""
    return binascii.crc_hqx(data, 0xFFFF)


def encode(frame: Frame) -> bytes:
    """The bytes to put on the wire, delimiter included."""
    body = json.dumps(frame.body, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_BODY:
        raise FrameError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    payload = HEADER.pack(VERSION, int(frame.type), frame.seq & 0xFFFF, len(body)) + body
    payload += struct.pack(">H", crc16(payload))
    return cobs.encode(payload) + DELIMITER


def decode(chunk: bytes) -> Frame:
    """One frame from the bytes between two delimiters; raises FrameError if untrustworthy."""
    if len(chunk) > MAX_BODY + 64:
        raise FrameError("frame too long")
    try:
        payload = cobs.decode(chunk)
    except cobs.DecodeError as exc:
        raise FrameError(f"bad COBS: {exc}") from exc
    if len(payload) < HEADER.size + 2:
        raise FrameError("frame too short")
    data, (crc,) = payload[:-2], struct.unpack(">H", payload[-2:])
    if crc16(data) != crc:
        raise FrameError("CRC mismatch")
    version, kind, seq, length = HEADER.unpack(data[: HEADER.size])
    if length != len(data) - HEADER.size:
        raise FrameError("length mismatch")
    if version != VERSION:
        raise FrameError(f"protocol version {version}, expected {VERSION}")
    try:
        message = MessageType(kind)
    except ValueError as exc:
        raise FrameError(f"unknown message type 0x{kind:02X}") from exc
    try:
        body = json.loads(data[HEADER.size :].decode("utf-8")) if len(data) > HEADER.size else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"bad body: {exc}") from exc
    if not isinstance(body, dict):
        raise FrameError("body is not an object")
    return Frame(message, seq, body)


class FrameReader:
    """Splits a byte stream into frames at the delimiters; keeps a partial frame for later."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        """Frames completed by ``data``, or the error for each bad one (in stream order)."""
        self._buffer += data
        out: list[Frame | FrameError] = []
        while True:
            end = self._buffer.find(DELIMITER)
            if end < 0:
                if len(self._buffer) > MAX_BODY + 64:
                    self._buffer.clear()
                    out.append(FrameError("no delimiter within the maximum frame size"))
                return out
            chunk = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if not chunk:
                continue  # back-to-back delimiters: resynchronisation padding
            try:
                out.append(decode(chunk))
            except FrameError as exc:
                out.append(exc)
