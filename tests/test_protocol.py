"""The wire protocol: round trips, and every single-byte corruption is detected (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.protocol import Frame, FrameError, FrameReader, MessageType, decode, encode

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
frames = st.builds(
    Frame,
    st.sampled_from(list(MessageType)),
    st.integers(0, 0xFFFF),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
)


@settings(max_examples=500)
@given(frames)
def test_a_frame_survives_a_round_trip(frame):
    wire = encode(frame)
    assert wire.endswith(b"\x00") and b"\x00" not in wire[:-1]
    assert decode(wire[:-1]) == frame


@settings(max_examples=300)
@given(frames, st.data())
def test_every_single_byte_corruption_is_detected(frame, data):
    wire = bytearray(encode(frame)[:-1])
    position = data.draw(st.integers(0, len(wire) - 1))
    replacement = data.draw(st.integers(0, 255).filter(lambda b: b != wire[position]))
    wire[position] = replacement
    reader = FrameReader()
    results = reader.feed(bytes(wire) + b"\x00")
    # Either the frame is rejected, or (a zero byte split it) every part is rejected:
    # a corrupted frame is never read as a frame.
    assert results and all(isinstance(r, FrameError) for r in results)


@pytest.mark.parametrize(
    "frame",
    [
        Frame(MessageType.METERSET, 513, {"meterset": 41.5, "dose_rate": 600.0}),
        Frame(MessageType.BEAM_ENDED, 0, {"meterset": 0.0, "termination": "MACHINE"}),
        Frame(MessageType.ACK, 65535, {}),
        Frame(MessageType.LOAD_BEAM, 2, {"beam": 3, "mlc": [0.0] * 40, "name": "B03_G180"}),
    ],
)
def test_every_single_byte_corruption_of_typical_frames_exhaustively(frame):
    wire = encode(frame)[:-1]
    for position in range(len(wire)):
        for value in range(256):
            if value == wire[position]:
                continue
            corrupted = wire[:position] + bytes([value]) + wire[position + 1 :]
            results = FrameReader().feed(corrupted + b"\x00")
            assert results and all(isinstance(r, FrameError) for r in results), (position, value)


def test_reader_resynchronises_after_garbage_and_partial_frames():
    first = Frame(MessageType.METERSET, 7, {"meterset": 12.5})
    second = Frame(MessageType.ACK, 7, {})
    reader = FrameReader()
    stream = b"\x13\x37garbage\x00" + encode(first) + encode(second)
    results = reader.feed(stream[:-5]) + reader.feed(stream[-5:])
    assert isinstance(results[0], FrameError)
    assert results[1:] == [first, second]


@pytest.mark.parametrize(
    ("chunk", "message"),
    [(b"\x01", "too short"), (b"\x05\x01\x02\x00", "COBS")],
)
def test_bad_frames_say_why(chunk, message):
    with pytest.raises(FrameError, match=message):
        decode(chunk)


def test_the_worked_frames_in_the_protocol_document_decode():
    """hil/PROTOCOL.md's worked frames are real frames: each `wire` line decodes to the
    `body` line above it, every body follows its schema, and encoding the body gives the
    same bytes (so a firmware engineer can test a framer against the document)."""
    import json
    import re

    from devices import schemas
    from devices.protocol import Frame, FrameReader, MessageType, crc16, encode
    from tests.conftest import REPO

    text = (REPO / "hil" / "PROTOCOL.md").read_text()
    section = text[text.index("## Worked frames") : text.index("## Changes from version 1")]
    assert f"0x{crc16(b'123456789'):04X}" in text
    heartbeat = re.search(r"^wire +((?:[0-9a-f]{2} )+00)$", section, re.MULTILINE)[1]
    ack = re.search(r"`((?:[0-9a-f]{2} )+00)`", section)[1]
    [beat] = FrameReader().feed(bytes.fromhex(heartbeat))
    [acked] = FrameReader().feed(bytes.fromhex(ack))
    assert (beat.type, beat.seq, acked.type, acked.seq) == (
        MessageType.HEARTBEAT,
        5,
        MessageType.ACK,
        5,
    )
    pairs = re.findall(r"^body  (\{.*\})\nwire  ((?:[0-9a-f]{2} )+00)$", section, re.MULTILINE)
    kinds = []
    for body_text, wire_text in pairs:
        wire = bytes.fromhex(wire_text)
        [frame] = FrameReader().feed(wire)
        assert frame.body == json.loads(body_text), body_text
        if frame.type != MessageType.NAK:
            assert schemas.problems(frame.type, frame.body) == [], frame
        assert encode(Frame(frame.type, frame.seq, frame.body)) == wire
        kinds.append(frame.type.name)
    assert sorted(kinds) == sorted(
        ["HELLO", "PROGRESS", "CONTROL_POINT", "MOVE_COUCH", "NAK", "ERROR", "IMAGES", "BEAM_ENDED"]
    ), kinds


def test_every_message_type_has_a_schema_and_a_broken_body_is_caught():
    from devices import schemas
    from devices.protocol import MessageType

    for kind in MessageType:
        schemas.problems(kind, {})  # loads and checks the schema itself (Draft 2020-12)
    assert schemas.problems(MessageType.METERSET, {"meterset": 1.5, "dose_rate": 600}) == []
    found = schemas.problems(MessageType.METERSET, {"meterset": "1.5"})
    assert any("dose_rate" in p for p in found) and any("meterset" in p for p in found)
    assert schemas.problems(MessageType.PROGRESS, {"operation": "BEAM_ON", "elapsed_s": 1})
