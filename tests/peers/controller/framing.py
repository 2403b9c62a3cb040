"""Frames of the controller wire protocol (hil/PROTOCOL.md, "Frames").

``wire := COBS(payload) 0x00`` and
``payload := framing:u8 type:u8 seq:u16be length:u32be body[length] crc:u16be``.
The body is UTF-8 JSON (an object), at most 1 MiB; the CRC is CRC-16/CCITT-FALSE over
framing..body.  Bodies are encoded with sorted keys and no spaces, which is how the worked
frames of the document are written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

FRAMING_VERSION = 1
PROTOCOL_VERSION = 2
MAX_BODY = 1 << 20  # 1 MiB
HEADER = struct.Struct(">BBHI")
SEQ_MODULO = 1 << 16

TYPES: dict[int, str] = {
    0x01: "HELLO",
    0x81: "HELLO_REPLY",
    0x02: "LOAD_BEAM",
    0x82: "LOADED",
    0x03: "BEAM_ON",
    0x83: "BEAM_STARTED",
    0x04: "INTERRUPT",
    0x05: "MOVE_COUCH",
    0x85: "COUCH_POSITION",
    0x06: "ACQUIRE",
    0x86: "IMAGES",
    0x07: "GET_STATE",
    0x10: "HEARTBEAT",
    0x90: "HEARTBEAT_REPLY",
    0xA0: "METERSET",
    0xA1: "CONTROL_POINT",
    0xA2: "BEAM_ENDED",
    0xA3: "STATE",
    0xA4: "PROGRESS",
    0xF0: "ACK",
    0xF1: "NAK",
    0xFE: "ERROR",
}
CODES: dict[str, int] = {name: code for code, name in TYPES.items()}
HOST_TO_CONTROLLER = frozenset(
    {
        "HELLO",
        "LOAD_BEAM",
        "BEAM_ON",
        "INTERRUPT",
        "MOVE_COUCH",
        "ACQUIRE",
        "GET_STATE",
        "HEARTBEAT",
    }
)
LINK_TYPES = frozenset({"ACK", "NAK"})


class FrameError(ValueError):
    """A frame that fails its checks; ``reason`` goes into the NAK."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: the type name, its sequence number and its JSON body."""

    name: str
    seq: int
    body: dict[str, Any]

    @property
    def code(self) -> int:
        return CODES[self.name]

    @property
    def is_data(self) -> bool:
        return self.name not in LINK_TYPES


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16_ccitt_false(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial 0xFFFF, no reflection, no final XOR."""
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing (no trailing delimiter)."""
    out = bytearray()
    chunks = bytes(data).split(b"\x00")
    for number, chunk in enumerate(chunks):
        last = number == len(chunks) - 1
        full_blocks = 0
        while len(chunk) >= 254:
            out.append(0xFF)
            out += chunk[:254]
            chunk = chunk[254:]
            full_blocks += 1
        if last and full_blocks and not chunk:
            break
        out.append(len(chunk) + 1)
        out += chunk
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Undo :func:`cobs_encode`; raises :class:`FrameError` on a malformed block."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError("COBS: zero byte inside a frame")
        i += 1
        end = i + code - 1
        if end > n:
            raise FrameError("COBS: block runs past the end of the frame")
        block = data[i:end]
        if 0 in block:
            raise FrameError("COBS: zero byte inside a block")
        out += block
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def body_bytes(body: dict[str, Any]) -> bytes:
    """A body as the wire carries it: compact UTF-8 JSON with sorted keys."""
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def encode_payload(code: int | str, seq: int, body: dict[str, Any] | bytes) -> bytes:
    """framing, type, seq, length, body and CRC (before COBS)."""
    if isinstance(code, str):
        code = CODES[code]
    raw = body if isinstance(body, bytes) else body_bytes(body)
    if len(raw) > MAX_BODY:
        raise ValueError(f"body of {len(raw)} bytes is over 1 MiB")
    head = HEADER.pack(FRAMING_VERSION, code, seq % SEQ_MODULO, len(raw)) + raw
    return head + struct.pack(">H", crc16_ccitt_false(head))


def encode_frame(code: int | str, seq: int, body: dict[str, Any] | bytes) -> bytes:
    """The wire bytes of a frame, the 0x00 delimiter included."""
    return cobs_encode(encode_payload(code, seq, body)) + b"\x00"


def decode_payload(payload: bytes) -> Frame:
    """Check and decode a payload (after COBS); raises :class:`FrameError`."""
    if len(payload) < HEADER.size + 2:
        raise FrameError("length: frame too short")
    framing, code, seq, length = HEADER.unpack_from(payload)
    if length > MAX_BODY:
        raise FrameError("length: body over 1 MiB")
    if length != len(payload) - HEADER.size - 2:
        raise FrameError("length mismatch")
    (crc,) = struct.unpack_from(">H", payload, len(payload) - 2)
    if crc16_ccitt_false(payload[:-2]) != crc:
        raise FrameError("CRC mismatch")
    if framing != FRAMING_VERSION:
        raise FrameError(f"framing version {framing}")
    if code not in TYPES:
        raise FrameError(f"unknown type 0x{code:02x}")
    raw = payload[HEADER.size : HEADER.size + length]
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("body is not UTF-8 JSON") from exc
    if not isinstance(body, dict):
        raise FrameError("body is not a JSON object")
    return Frame(TYPES[code], seq, body)


def decode_frame(chunk: bytes) -> Frame:
    """Decode one frame's wire bytes (with or without its trailing 0x00)."""
    if chunk.endswith(b"\x00"):
        chunk = chunk[:-1]
    return decode_payload(cobs_decode(chunk))


MAX_WIRE = (HEADER.size + MAX_BODY + 2) * 255 // 254 + 8


class FrameSplitter:
    """Cut a byte stream at 0x00 delimiters.

    ``feed`` returns the complete chunks (without delimiter); empty chunks (two zeros in a
    row) are skipped; a run longer than any valid frame is returned as ``b"\\xff"`` markers,
    which then fail COBS and are NAKed, and the receiver resynchronises at the next zero.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._overflowed = False

    def clear(self) -> None:
        self._buffer.clear()
        self._overflowed = False

    def feed(self, data: bytes) -> list[bytes]:
        chunks: list[bytes] = []
        start = 0
        while True:
            zero = data.find(b"\x00", start)
            if zero < 0:
                break
            part = data[start:zero]
            if self._overflowed:
                chunks.append(b"\xff")
                self._overflowed = False
                self._buffer.clear()
            else:
                self._buffer += part
                if self._buffer:
                    chunks.append(bytes(self._buffer))
                self._buffer.clear()
            start = zero + 1
        if not self._overflowed:
            self._buffer += data[start:]
            if len(self._buffer) > MAX_WIRE:
                self._buffer.clear()
                self._overflowed = True
        return chunks


def is_finite_number(value: Any) -> bool:
    """A JSON number (not a boolean), finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def seq_relation(expected: int, seq: int) -> str:
    """``"expected"``, ``"duplicate"`` or ``"ahead"`` (Reliability, modulo 65536)."""
    if seq == expected:
        return "expected"
    behind = (expected - seq) % SEQ_MODULO
    if 1 <= behind <= 32767:
        return "duplicate"
    return "ahead"
