"""The independent controller (tests/peers/controller), checked against hil/PROTOCOL.md and
hil/schemas only, with a minimal host written here from the document."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cobs import cobs as reference_cobs
from jsonschema import Draft202012Validator

from tests.peers.controller import (
    COUCH_AXES,
    IEC_TO_LPS,
    IndependentController,
    extrinsic_xyz,
    lps_to_table_top,
)
from tests.peers.controller.framing import (
    FrameError,
    FrameSplitter,
    body_bytes,
    cobs_decode,
    cobs_encode,
    crc16_ccitt_false,
    decode_frame,
    encode_frame,
    encode_payload,
    seq_relation,
)

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "hil" / "PROTOCOL.md"
SCHEMAS = {
    path.stem: Draft202012Validator(json.loads(path.read_text()))
    for path in (ROOT / "hil" / "schemas").glob("*.json")
}
SCALE = 0.05
# the default CBCT grid (64 x 64 x 24 voxels, 6 mm x 2.5 mm) centred on the isocentre
GRID_ORIGIN = np.array([-189.0, -189.0, -28.75])


def schema_problems(name: str, body: dict[str, Any]) -> list[str]:
    validator = SCHEMAS.get(name)
    if validator is None:
        return [f"no schema for {name}"]
    return [f"{name}: {error.message}" for error in validator.iter_errors(body)]


# --------------------------------------------------------------------------- the host --


class LinkLost(Exception):
    pass


class MiniHost:
    """A host from the document: stop and wait, 200 ms x 5, ACK/NAK, duplicates."""

    def __init__(self, sock: socket.socket | None = None, fd: int | None = None) -> None:
        self.sock = sock
        self.fd = fd
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.auto_ack = True
        self.next_seq = 0
        self.expected = 0
        self.frames: list[tuple[float, str, int, dict[str, Any]]] = []
        self.link_frames: list[tuple[float, str, int, dict[str, Any]]] = []
        self.garbled: list[str] = []
        self.problems: list[str] = []
        self.cursor = 0
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.splitter = FrameSplitter()
        self._stop = False
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        self.reader.start()

    @classmethod
    def tcp(cls, address: tuple[str, int]) -> MiniHost:
        return cls(sock=socket.create_connection(address, timeout=2.0))

    @classmethod
    def serial(cls, path: str) -> MiniHost:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        return cls(fd=fd)

    # raw bytes ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            assert self.fd is not None
            os.write(self.fd, data)

    def _read(self) -> bytes | None:
        src = self.sock if self.sock is not None else self.fd
        try:
            ready, _, _ = select.select([src], [], [], 0.05)
        except (OSError, ValueError):
            return b""
        if not ready:
            return None
        try:
            if self.sock is not None:
                return self.sock.recv(65536)
            assert self.fd is not None
            return os.read(self.fd, 65536)
        except OSError:
            return b""

    def _read_loop(self) -> None:
        while not self._stop:
            data = self._read()
            if data is None:
                continue
            if not data:
                self.closed.set()
                with self.cond:
                    self.cond.notify_all()
                return
            for chunk in self.splitter.feed(data):
                self._handle(chunk)

    def _handle(self, chunk: bytes) -> None:
        now = time.monotonic()
        try:
            frame = decode_frame(chunk)
        except FrameError as exc:
            self.garbled.append(str(exc))
            return
        self.problems += schema_problems(frame.name, frame.body)
        if frame.name in ("ACK", "NAK"):
            with self.cond:
                self.link_frames.append((now, frame.name, frame.seq, frame.body))
                self.cond.notify_all()
            return
        relation = seq_relation(self.expected, frame.seq)
        if not self.auto_ack:
            with self.cond:
                self.frames.append((now, frame.name, frame.seq, frame.body))
                self.cond.notify_all()
            return
        if relation == "ahead":
            self.write(encode_frame("NAK", self.expected, {"reason": "out of order"}))
            return
        self.write(encode_frame("ACK", frame.seq, {}))
        if relation == "expected":
            with self.cond:
                self.expected = (self.expected + 1) % 65536
                self.frames.append((now, frame.name, frame.seq, frame.body))
                self.cond.notify_all()

    # sending ------------------------------------------------------------------------------

    def send(
        self, name: str, body: dict[str, Any], seq: int | None = None, validate: bool = True
    ) -> int:
        """Send a data frame and wait for its ACK (retransmitting as the document says)."""
        if validate:
            self.problems += schema_problems(name, body)
        with self.send_lock:
            if seq is None:
                seq = self.next_seq
                self.next_seq = (self.next_seq + 1) % 65536
            wire = encode_frame(name, seq, body)
            with self.cond:
                mark = len(self.link_frames)
            for _attempt in range(6):
                self.write(wire)
                deadline = time.monotonic() + 0.2
                with self.cond:
                    while True:
                        for _, kind, got, _ in self.link_frames[mark:]:
                            if kind == "ACK" and got == seq:
                                return seq
                        nak = any(kind == "NAK" for _, kind, _, _ in self.link_frames[mark:])
                        remaining = deadline - time.monotonic()
                        if nak or remaining <= 0 or self.closed.is_set():
                            mark = len(self.link_frames)
                            break
                        self.cond.wait(remaining)
                if self.closed.is_set():
                    break
            raise LinkLost(f"{name} seq {seq} not acknowledged")

    def hello(self, protocol: int = 2) -> dict[str, Any]:
        with self.send_lock:
            self.next_seq = 0
        with self.cond:
            self.expected = 0
            self.cursor = len(self.frames)
        self.send("HELLO", {"protocol": protocol})
        return self.wait_for("HELLO_REPLY", "ERROR")[1]

    def request(
        self,
        name: str,
        body: dict[str, Any],
        *replies: str,
        timeout: float = 5.0,
        validate: bool = True,
    ):
        self.send(name, body, validate=validate)
        return self.wait_for(*replies, "ERROR", timeout=timeout)

    # receiving ----------------------------------------------------------------------------

    def wait_for(self, *names: str, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(self.cursor, len(self.frames)):
                    _, name, _, body = self.frames[i]
                    if name in names:
                        self.cursor = i + 1
                        return name, body
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [f[1] for f in self.frames[self.cursor :]]
                    raise AssertionError(f"no {names} within {timeout} s; saw {seen}")
                self.cond.wait(min(remaining, 0.05))

    def mark(self) -> int:
        with self.cond:
            return len(self.frames)

    def since(self, mark: int, *names: str) -> list[tuple[float, str, int, dict[str, Any]]]:
        with self.cond:
            return [f for f in self.frames[mark:] if not names or f[1] in names]

    def wait_link(self, kind: str, mark: int, timeout: float = 2.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for frame in self.link_frames[mark:]:
                    if frame[1] == kind:
                        return frame
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {kind} within {timeout} s")
                self.cond.wait(remaining)

    def link_mark(self) -> int:
        with self.cond:
            return len(self.link_frames)

    def close(self, abort: bool = False) -> None:
        self._stop = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                if abort:
                    self.sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" + b"\x00" * 4
                    )
                self.sock.close()
        elif self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.reader.join(timeout=1.0)


@contextlib.contextmanager
def heartbeats(host: MiniHost, period: float = 0.5):
    """HEARTBEAT every heartbeat_s (0.5 s) while a beam is on, as the host must."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(period):
            with contextlib.suppress(LinkLost, OSError):
                host.send("HEARTBEAT", {})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)


def program(
    beam: int = 1,
    cumulative=(0.0, 50.0, 100.0),
    gantry=None,
    start: float = 0.0,
    end: float | None = None,
    energy: float = 6,
    rate: float = 600,
    leaves: int = 120,
) -> dict[str, Any]:
    gantry = gantry or [30.0] * len(cumulative)
    return {
        "beam_number": beam,
        "name": f"B{beam}",
        "energy_mv": energy,
        "dose_rate": rate,
        "total_meterset": cumulative[-1],
        "start_meterset": start,
        "end_meterset": end,
        "control_points": [
            {
                "index": i,
                "cumulative_meterset": mu,
                "gantry_angle": g,
                "collimator_angle": 0.0,
                "jaws": [-50.0, 50.0, -50.0, 50.0],
                "mlc": [-10.0 - i] * (leaves // 2) + [10.0 + i] * (leaves // 2),
            }
            for i, (mu, g) in enumerate(zip(cumulative, gantry, strict=True))
        ],
    }


def move(**axes: float) -> dict[str, float]:
    body = dict.fromkeys(COUCH_AXES, 0.0)
    body.update(axes)
    return body


@pytest.fixture
def rig(request):
    kwargs = dict(getattr(request, "param", {}))
    ctrl = IndependentController(time_scale=kwargs.pop("time_scale", SCALE), **kwargs)
    address = ctrl.serve_tcp()
    host = MiniHost.tcp(address)
    yield ctrl, host, address
    host.close()
    ctrl.stop()
    assert host.problems == []
    if not getattr(ctrl, "_test_nonconformant", False):
        sent = [
            problem
            for _, way, name, body in ctrl.traffic
            if way == "sent"
            for problem in schema_problems(name, body)
        ]
        assert sent == []


def load(host: MiniHost, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    name, reply = host.request("LOAD_BEAM", body, "LOADED", timeout=timeout)
    assert name == "LOADED", reply
    return reply


def deliver(host: MiniHost, timeout: float = 10.0):
    """BEAM_ON to BEAM_ENDED: (BEAM_STARTED body, frames in between, BEAM_ENDED body)."""
    mark = host.mark()
    name, started = host.request("BEAM_ON", {}, "BEAM_STARTED")
    assert name == "BEAM_STARTED", started
    with heartbeats(host):
        _, ended = host.wait_for("BEAM_ENDED", timeout=timeout)
    between = host.since(mark, "METERSET", "CONTROL_POINT")
    return started, between, ended


# ---------------------------------------------------------------------------- framing --


def test_crc_check_value():
    assert crc16_ccitt_false(b"123456789") == 0x29B1


def test_cobs_matches_reference_package():
    rng = np.random.default_rng(7)
    samples = [b"", b"\x00", b"\x00\x00", b"\x01" * 253, b"\x01" * 254, b"\x01" * 255]
    samples += [b"\x01" * 254 + b"\x00", b"\x02" * 600, bytes(range(256)) * 3]
    for n in (1, 2, 10, 253, 254, 255, 508, 1000):
        samples.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        samples.append(rng.integers(1, 256, n, dtype=np.uint8).tobytes())
    for data in samples:
        assert cobs_encode(data) == reference_cobs.encode(data)
        assert cobs_decode(cobs_encode(data)) == data
        assert 0 not in cobs_encode(data)


def _worked_frames() -> list[dict[str, Any]]:
    """Every frame shown in PROTOCOL.md's "## Worked frames" section."""
    text = PROTOCOL.read_text()
    section = text.split("## Worked frames", 1)[1].split("\n## ", 1)[0]
    parts = section.split("```")
    frames = []
    for i in range(1, len(parts), 2):
        title = [line for line in parts[i - 1].splitlines() if line.strip()][-1]
        lines = {line.split()[0]: line for line in parts[i].strip().splitlines()}
        wire = bytes.fromhex(lines["wire"].split(None, 1)[1])
        if "body" in lines:
            body_text = lines["body"].split(None, 1)[1].strip()
        else:
            tokens = lines["payload"].split()[1:]
            payload = bytes.fromhex("".join(t for t in tokens if re.fullmatch("[0-9a-f]{2}", t)))
            crc = bytes.fromhex("".join(lines["crc"].split()[1:3]))
            assert wire == cobs_encode(payload + crc) + b"\x00"
            assert crc16_ccitt_false(payload) == int.from_bytes(crc, "big")
            body_text = payload[8:].decode()
        name = re.search(r"\b([A-Z][A-Z_]*[A-Z])\b", title).group(1)
        seq = int(re.findall(r"`seq` (\d+)", title)[-1])
        frames.append({"name": name, "seq": seq, "body_text": body_text, "wire": wire})
    for match in re.finditer(r"ACK of it is `([0-9a-f ]+)`", section):
        frames.append(
            {"name": "ACK", "seq": 5, "body_text": "{}", "wire": bytes.fromhex(match.group(1))}
        )
    return frames


def test_worked_frames_decode_and_encode():
    frames = _worked_frames()
    names = [f["name"] for f in frames]
    assert names == [
        "HEARTBEAT",
        "HELLO",
        "PROGRESS",
        "CONTROL_POINT",
        "MOVE_COUCH",
        "NAK",
        "ERROR",
        "IMAGES",
        "BEAM_ENDED",
        "ACK",
    ]
    for worked in frames:
        frame = decode_frame(worked["wire"])
        assert frame.name == worked["name"]
        assert frame.seq == worked["seq"]
        assert frame.body == json.loads(worked["body_text"])
        assert body_bytes(frame.body).decode() == worked["body_text"]
        assert encode_frame(frame.name, frame.seq, frame.body) == worked["wire"]
        assert schema_problems(frame.name, frame.body) == []
    images = next(f for f in frames if f["name"] == "IMAGES")
    body = decode_frame(images["wire"]).body
    plane = np.frombuffer(base64.b64decode(body["planes"][0]), dtype="<u2")
    assert plane.tolist() == [1024, 2024, 3048, 4072]


def test_frame_checks_reject_garbage():
    good = encode_payload("GET_STATE", 3, {})
    with pytest.raises(FrameError, match="CRC"):
        decode_frame(cobs_encode(good[:-1] + bytes([good[-1] ^ 1])))
    with pytest.raises(FrameError, match="framing"):
        bad = b"\x02" + good[1:-2]
        decode_frame(cobs_encode(bad + crc16_ccitt_false(bad).to_bytes(2, "big")))
    with pytest.raises(FrameError, match="type"):
        bad = good[:1] + b"\x55" + good[2:-2]
        decode_frame(cobs_encode(bad + crc16_ccitt_false(bad).to_bytes(2, "big")))
    with pytest.raises(FrameError, match="length"):
        decode_frame(cobs_encode(good[:5]))
    with pytest.raises(FrameError, match="JSON"):
        decode_frame(cobs_encode(encode_payload("GET_STATE", 3, b"[1]")))
    with pytest.raises(FrameError, match="JSON"):
        decode_frame(cobs_encode(encode_payload("GET_STATE", 3, b'{"a": NaN}')))
    with pytest.raises(FrameError, match="COBS"):
        decode_frame(b"\x05\x01\x02")
    splitter = FrameSplitter()
    assert splitter.feed(b"\x00\x00ab") == []
    assert splitter.feed(b"c\x00d") == [b"abc"]


def test_sequence_relation_wraps_modulo_65536():
    assert seq_relation(0, 0) == "expected"
    assert seq_relation(0, 65535) == "duplicate"
    assert seq_relation(5, 4) == "duplicate"
    assert seq_relation(5, 6) == "ahead"
    assert seq_relation(1, 32770) == "duplicate"  # 1 - 32770 mod 65536 = 32767
    assert seq_relation(1, 32769) == "ahead"  # 32768 behind: ahead
    assert seq_relation(65535, 0) == "ahead"


# ------------------------------------------------------------------------- sessions --


def test_hello_reply_is_protocol_2_and_states_its_machine(rig):
    ctrl, host, _ = rig
    reply = host.hello()
    assert reply["protocol"] == 2
    assert schema_problems("HELLO_REPLY", reply) == []
    caps = reply["capabilities"]
    assert caps["energies_mv"] == [6, 10, 15]
    assert (caps["min_dose_rate"], caps["max_dose_rate"]) == (100, 1400)
    assert caps["mlc_leaf_pairs"] == 60
    assert caps["couch_limits_mm"] == 50 and caps["couch_rotation_limits_deg"] == 3
    assert caps["couch_tolerance_mm"] == 1.0 and caps["couch_tolerance_deg"] == 0.5
    assert caps["couch_retries"] == 1 and caps["meterset_tolerance_mu"] == 1.0
    assert reply["last_delivery"] is None
    assert reply["couch"] == dict.fromkeys(COUCH_AXES, 0.0)
    timing = reply["timing"]
    # the controller states every figure of the Timing table, whichever side it binds
    assert set(timing) >= {
        "progress_interval_s",
        "tick_s",
        "silence_s",
        "heartbeat_s",
        "hello_s",
        "reconnect_s",
        "max_s",
    }
    assert set(timing["max_s"]) == {"LOAD_BEAM", "MOVE_COUCH", "ACQUIRE"}
    assert timing["tick_s"] == pytest.approx(max(0.2 * SCALE, 0.05))
    assert timing["progress_interval_s"] == pytest.approx(max(1.0 * SCALE, 0.1))
    assert timing["max_s"]["ACQUIRE"] == pytest.approx(2 * 60 * SCALE + 5)
    assert (timing["silence_s"], timing["heartbeat_s"]) == (5.0, 0.5)
    assert (timing["hello_s"], timing["reconnect_s"]) == (5.0, 10.0)
    # PROGRESS comes well inside the silence the host allows
    assert timing["progress_interval_s"] < timing["silence_s"]
    assert host.frames[-1][2] == 0  # HELLO_REPLY is seq 0 of the session
    _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
    assert beat == {"state": "idle", "sessions": 1}
    assert ctrl.sessions == 1


def test_hello_for_another_version_is_unsupported(rig):
    ctrl, host, _ = rig
    name, body = host.request("HELLO", {"protocol": 1}, "HELLO_REPLY")
    assert name == "ERROR"
    assert body["code"] == "UNSUPPORTED" and body["request"] == "HELLO"
    assert host.hello()["protocol"] == 2
    # sessions counts every HELLO answered: the ERROR answered the first
    _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
    assert beat["sessions"] == 2 == ctrl.sessions


def test_get_state(rig):
    _, host, _ = rig
    host.hello()
    name, state = host.request("GET_STATE", {}, "STATE")
    assert name == "STATE"
    assert state["beam_on"] is False and state["busy"] == ""
    assert len(state["mlc"]) == 120 and len(state["jaws"]) == 4


def test_retransmitted_hello_starts_the_session_again(rig):
    ctrl, host, _ = rig
    host.hello()
    mark = host.mark()
    # the host's HELLO again with seq 0 (as if its ACK were lost): a new session, reply seq 0
    host.write(encode_frame("HELLO", 0, {"protocol": 2}))
    time.sleep(0.3)
    # the host's expected is 1 now, so that HELLO_REPLY seq 0 is a duplicate: re-ACKed only
    assert host.since(mark) == []
    assert ctrl.sessions == 2
    _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
    assert beat["sessions"] == 2


# ------------------------------------------------------------------ long operations --


def test_long_operation_runs_apart_from_frame_handling(rig):
    ctrl, host, _ = rig
    reply = host.hello()
    interval = reply["timing"]["progress_interval_s"]
    mark = host.mark()
    host.send("LOAD_BEAM", program(gantry=[90.0, 90.0, 90.0]))  # 90 deg: 15 s machine time
    t0 = time.monotonic()
    _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
    assert beat["state"] == "busy"
    _, state = host.request("GET_STATE", {}, "STATE")
    assert state["busy"] == "LOAD_BEAM" and 0 <= state["gantry_angle"] < 90
    name, error = host.request("MOVE_COUCH", move(lateral_mm=5), "COUCH_POSITION")
    assert (name, error["code"], error["request"]) == ("ERROR", "BUSY", "MOVE_COUCH")
    name, error = host.request("ACQUIRE", {"kind": "CBCT"}, "IMAGES")
    assert (name, error["code"]) == ("ERROR", "BUSY")
    name, error = host.request("BEAM_ON", {}, "BEAM_STARTED")  # BUSY, not NOT_LOADED
    assert (name, error["code"], error["request"]) == ("ERROR", "BUSY", "BEAM_ON")
    host.send("INTERRUPT", {"reason": "nothing to hold"})
    assert time.monotonic() - t0 < 15 * SCALE  # all answered while it still runs
    name, loaded = host.wait_for("LOADED", "ERROR", timeout=5)
    assert (name, loaded) == ("LOADED", {"beam": 1})
    elapsed = time.monotonic() - t0
    assert elapsed >= 15 * SCALE * 0.9
    progress = host.since(mark, "PROGRESS")
    assert len(progress) >= 5
    times = [t0] + [f[0] for f in progress]
    assert max(b - a for a, b in itertools.pairwise(times)) <= interval + 0.01
    dones = [f[3]["done"] for f in progress]
    assert dones == sorted(dones) and all(f[3]["operation"] == "LOAD_BEAM" for f in progress)
    assert ctrl.couch_position() == dict.fromkeys(COUCH_AXES, 0.0)  # the BUSY move never ran
    _, state = host.request("GET_STATE", {}, "STATE")
    assert state["gantry_angle"] == pytest.approx(90.0) and state["busy"] == ""
    # no travel: no time
    mark = host.mark()
    t0 = time.monotonic()
    load(host, program(beam=2, gantry=[90.0, 90.0, 90.0]))
    assert time.monotonic() - t0 < interval and host.since(mark, "PROGRESS") == []
    name, reply = host.request("MOVE_COUCH", move(), "COUCH_POSITION")
    assert reply == dict.fromkeys(COUCH_AXES, 0.0)


@pytest.mark.parametrize("rig", [{"time_scale": 0.3}], indirect=True)
def test_beam_on_and_interrupt_during_a_move_do_not_disturb_it(rig):
    ctrl, host, _ = rig
    host.hello()
    load(host, program(cumulative=(0.0, 5.0), gantry=[0.0, 0.0]))  # no travel: at once
    mark = host.mark()
    host.send("MOVE_COUCH", move(longitudinal_mm=45.0))  # 2.25 s machine, 0.675 s here
    name, error = host.request("BEAM_ON", {}, "BEAM_STARTED")
    assert (name, error["code"], error["request"]) == ("ERROR", "BUSY", "BEAM_ON")
    # INTERRUPT is a beam hold only: the move runs on to its answer
    host.send("INTERRUPT", {"reason": "operator pressed hold"})
    _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
    assert beat["state"] == "busy"
    name, position = host.wait_for("COUCH_POSITION", "ERROR", timeout=3.0)
    assert name == "COUCH_POSITION" and position["longitudinal_mm"] == pytest.approx(45.0)
    assert [f[1] for f in host.since(mark, "ERROR")] == ["ERROR"]  # the BEAM_ON's only
    # the refused BEAM_ON did not use up the loaded beam
    started, _, ended = deliver(host)
    assert started == {"beam": 1, "start_meterset": 0.0}
    assert ended["termination"] == "NORMAL"
    assert ctrl.deliveries[-1].measured == ended["meterset"]


def test_beam_on_without_a_loaded_beam(rig):
    _, host, _ = rig
    host.hello()
    name, body = host.request("BEAM_ON", {}, "BEAM_STARTED")
    assert name == "ERROR"
    assert body["code"] == "NOT_LOADED" and body["request"] == "BEAM_ON"


def test_bad_requests_and_limits(rig):
    _, host, _ = rig
    host.hello()
    cases = [
        ({k: v for k, v in program().items() if k != "dose_rate"}, "BAD_REQUEST"),
        ({**program(), "total_meterset": "100"}, "BAD_REQUEST"),
        (program(start=100.0), "BAD_REQUEST"),
        (program(energy=18), "LIMIT"),
        (program(rate=2000), "LIMIT"),
        (program(leaves=80), "LIMIT"),
    ]
    for body, code in cases:
        name, reply = host.request("LOAD_BEAM", body, "LOADED", validate=False)
        assert (name, reply["code"], reply["request"]) == ("ERROR", code, "LOAD_BEAM")
    name, reply = host.request("MOVE_COUCH", {"lateral_mm": 1.0}, "COUCH_POSITION", validate=False)
    assert (name, reply["code"]) == ("ERROR", "BAD_REQUEST")
    name, reply = host.request("ACQUIRE", {"kind": "MV_PORTAL"}, "IMAGES")
    assert (name, reply["code"]) == ("ERROR", "LIMIT")
    name, reply = host.request("BEAM_ON", {}, "BEAM_STARTED")
    assert reply["code"] == "NOT_LOADED"


# --------------------------------------------------------------------------- delivery --


def test_beam_delivers_measured_meterset_and_control_points(rig):
    ctrl, host, _ = rig
    reply = host.hello()
    tick = reply["timing"]["tick_s"]
    body = program(cumulative=[0.0, 25.0, 60.0, 100.0], gantry=[180.0, 181.0, 182.0, 183.0])
    load(host, body)
    clock = time.time() - time.monotonic()
    mark = host.mark()
    started, between, ended = deliver(host)
    assert started == {"beam": 1, "start_meterset": 0.0}
    time.sleep(4 * tick)
    frames = host.since(mark)
    names = [f[1] for f in frames]
    # BEAM_ENDED is the last frame of its beam-on: nothing of that beam-on follows it
    end = names.index("BEAM_ENDED")
    assert not {"METERSET", "CONTROL_POINT"} & set(names[end:])
    record = ctrl.deliveries[-1]
    # ... and goes within tick_s of the beam stopping (a little slack for the threads)
    assert 0 <= frames[end][0] + clock - record.ended_at <= tick + 0.03
    # the first METERSET within tick_s of the first MU (counted as the beam came on)
    first_meterset = names.index("METERSET")
    assert frames[first_meterset][0] - frames[names.index("BEAM_STARTED")][0] <= tick + 0.03
    metersets = [f[3]["meterset"] for f in between if f[1] == "METERSET"]
    assert len(metersets) >= 5
    assert metersets == sorted(metersets) and metersets[0] > 0
    times = [f[0] for f in between if f[1] == "METERSET"]
    assert max(b - a for a, b in itertools.pairwise(times)) <= tick + 0.01
    points = [f[3] for f in between if f[1] == "CONTROL_POINT"]
    assert [p["index"] for p in points] == [1, 2, 3]
    for point, planned in zip(points, [25.0, 60.0, 100.0], strict=True):
        assert planned <= point["meterset"] < planned + 1.0
    assert [p["gantry"] for p in points] == pytest.approx([181.0, 182.0, 183.0], abs=0.15)
    # every count the host hears is non-decreasing, in frame order
    counts = [f[3]["meterset"] for f in between]
    assert counts == sorted(counts)
    assert ended["termination"] == "NORMAL" and ended["reason"] == "" and ended["code"] == ""
    assert ended["meterset"] >= metersets[-1]
    assert abs(ended["meterset"] - 100.0) <= reply["capabilities"]["meterset_tolerance_mu"]
    # a beam is loaded for one BEAM_ON only
    _name, error = host.request("BEAM_ON", {}, "BEAM_STARTED")
    assert error["code"] == "NOT_LOADED"
    record = ctrl.deliveries[-1]
    assert (record.beam, record.start, record.termination) == (1, 0.0, "NORMAL")
    assert record.measured == ended["meterset"]
    last = host.hello()["last_delivery"]
    assert last["beam"] == 1 and last["start"] == 0 and last["termination"] == "NORMAL"
    assert last["measured"] == ended["meterset"]
    assert (last["code"], last["reason"]) == ("", "")


def test_a_ramp_up_longer_than_the_silence_allows_sends_beam_started_at_once():
    # real time: a 0.5 s ramp-up; a host that allows 0.6 s of silence gets BEAM_STARTED at
    # once and the first METERSET later (Delivery)
    with IndependentController(time_scale=1.0, timing={"silence_s": 0.6}) as ctrl:
        host = MiniHost.tcp(ctrl.serve_tcp())
        try:
            reply = host.hello()
            assert reply["timing"]["silence_s"] == 0.6
            load(host, program(cumulative=(0.0, 10.0), gantry=[0.0, 0.0]))  # no travel
            t0 = time.monotonic()
            mark = host.mark()
            name, started = host.request("BEAM_ON", {}, "BEAM_STARTED")
            assert name == "BEAM_STARTED" and started == {"beam": 1, "start_meterset": 0.0}
            assert time.monotonic() - t0 < 0.3
            with heartbeats(host):
                host.wait_for("METERSET", timeout=2.0)
                host.send("INTERRUPT", {"reason": "enough"})
                _, ended = host.wait_for("BEAM_ENDED", timeout=2.0)
            frames = host.since(mark)
            names = [f[1] for f in frames]
            assert names[0] == "BEAM_STARTED" and names[-1] == "BEAM_ENDED"
            assert names.count("BEAM_STARTED") == 1
            first = frames[names.index("METERSET")]
            assert first[0] - t0 >= 0.45 and first[3]["meterset"] > 0
            assert ended["termination"] == "OPERATOR"
        finally:
            host.close()


def test_continuation_reports_only_later_control_points(rig):
    _, host, _ = rig
    host.hello()
    load(host, program(beam=3, cumulative=[0.0, 30.0, 60.0, 100.0], start=40.0, end=90.0))
    started, between, ended = deliver(host)
    assert started == {"beam": 3, "start_meterset": 40.0}
    metersets = [f[3]["meterset"] for f in between if f[1] == "METERSET"]
    assert metersets[0] > 40.0
    assert [f[3]["index"] for f in between if f[1] == "CONTROL_POINT"] == [2]
    assert ended["termination"] == "NORMAL"
    assert 90.0 <= ended["meterset"] < 91.0


def test_step_and_shoot_segments_without_mu(rig):
    _, host, _ = rig
    host.hello()
    load(host, program(cumulative=[0.0, 50.0, 50.0, 100.0]))
    _, between, ended = deliver(host)
    points = [f[3] for f in between if f[1] == "CONTROL_POINT"]
    assert [p["index"] for p in points] == [1, 2, 3]
    assert points[0]["meterset"] == points[1]["meterset"]
    assert ended["termination"] == "NORMAL"


def test_first_meterset_waits_for_the_first_monitor_unit(rig):
    # the first segment moves the gantry 12 degrees without MU (2 s machine, 0.1 s here)
    _, host, _ = rig
    host.hello()
    load(host, program(cumulative=[0.0, 0.0, 20.0], gantry=[0.0, 12.0, 12.0]))
    _, between, ended = deliver(host)
    names = [f[1] for f in between]
    assert names[0] == "CONTROL_POINT" and between[0][3]["index"] == 1
    assert between[0][3]["meterset"] == 0.0
    metersets = [f[3]["meterset"] for f in between if f[1] == "METERSET"]
    assert metersets and metersets[0] > 0.0  # never the start count before the first MU
    assert ended["termination"] == "NORMAL"


def test_arc_through_zero_is_slowed_by_the_gantry(rig):
    ctrl, host, _ = rig
    host.hello()
    gantry = [356.0, 0.0, 4.0, 8.0]
    load(host, program(cumulative=[0.0, 2.0, 4.0, 6.0], gantry=gantry, rate=600))
    _, between, ended = deliver(host)
    points = [f[3] for f in between if f[1] == "CONTROL_POINT"]
    assert [p["index"] for p in points] == [1, 2, 3]
    readings = [(p["gantry"] + 180) % 360 - 180 for p in points]
    assert readings == pytest.approx([0.0, 4.0, 8.0], abs=0.15)
    # 4 degrees per 2 MU at 6 deg/s: the dose rate falls to 180 MU/min, measured
    rates = [f[3]["dose_rate"] for f in between if f[1] == "METERSET"][1:-1]
    assert rates and all(150 <= r <= 200 for r in rates), rates
    assert ended["termination"] == "NORMAL"
    assert ctrl.machine_state()["gantry_angle"] == pytest.approx(8.0)


def test_interrupt_holds_the_beam_operator(rig):
    ctrl, host, _ = rig
    host.hello()
    load(host, program(cumulative=[0.0, 400.0], rate=400))  # 60 s machine, 3 s here
    host.request("BEAM_ON", {}, "BEAM_STARTED")
    with heartbeats(host):
        host.wait_for("METERSET")
        name, error = host.request("MOVE_COUCH", move(vertical_mm=1.0), "COUCH_POSITION")
        assert (name, error["code"]) == ("ERROR", "BUSY")
        name, error = host.request("ACQUIRE", {"kind": "CBCT"}, "IMAGES")
        assert (name, error["code"]) == ("ERROR", "BUSY")
        name, error = host.request("LOAD_BEAM", program(beam=2), "LOADED")
        assert (name, error["code"]) == ("ERROR", "BUSY")
        name, error = host.request("BEAM_ON", {}, "BEAM_STARTED")
        assert (name, error["code"]) == ("ERROR", "BUSY")
        _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
        assert beat["state"] == "beam_on"
        _, state = host.request("GET_STATE", {}, "STATE")
        assert state["beam_on"] is True
        host.send("INTERRUPT", {"reason": "patient moved"})
        _, ended = host.wait_for("BEAM_ENDED", timeout=1.0)
    assert ended["termination"] == "OPERATOR"
    assert ended["reason"] == "patient moved" and ended["code"] == ""
    assert 0 < ended["meterset"] < 400
    assert ctrl.deliveries[-1].termination == "OPERATOR"
    last = host.hello()["last_delivery"]
    assert (last["termination"], last["code"], last["reason"]) == ("OPERATOR", "", "patient moved")


def test_hello_with_the_beam_on_ends_it(rig):
    ctrl, host, _ = rig
    host_reply = host.hello()
    load(host, program(cumulative=[0.0, 400.0], rate=400))
    host.request("BEAM_ON", {}, "BEAM_STARTED")
    host.wait_for("METERSET")
    # while the beam is on: termination, code and reason ""
    on = ctrl.last_delivery
    assert (on["termination"], on["code"], on["reason"]) == ("", "", "")
    assert schema_problems("HELLO_REPLY", {**host_reply, "last_delivery": on}) == []
    reply = host.hello()
    last = reply["last_delivery"]
    assert last["termination"] == "MACHINE" and last["code"] == "LINK" and last["reason"]
    assert 0 < last["measured"] < 400
    record = ctrl.deliveries[-1]
    assert (last["code"], last["reason"]) == (record.code, record.reason)


def test_dropped_host_mid_beam_leaves_machine_link(rig):
    ctrl, host, address = rig
    host.hello()
    load(host, program(beam=2, cumulative=[0.0, 400.0], rate=400))
    host.request("BEAM_ON", {}, "BEAM_STARTED")
    host.wait_for("METERSET")
    time.sleep(0.3)
    heard = host.since(0, "METERSET")[-1][3]["meterset"]
    host.close(abort=True)
    time.sleep(0.2)
    stopped = ctrl.deliveries[-1]
    assert (stopped.termination, stopped.code) == ("MACHINE", "LINK")
    time.sleep(0.3)
    assert ctrl.deliveries[-1].measured == stopped.measured  # stopped at once, for good
    again = MiniHost.tcp(address)
    try:
        last = again.hello()["last_delivery"]
        assert last["beam"] == 2 and last["start"] == 0
        assert last["termination"] == "MACHINE" and last["code"] == "LINK"
        assert "host lost" in last["reason"]
        assert heard <= last["measured"] < 400
        assert again.problems == []
    finally:
        again.close()


def test_silent_host_mid_beam_stops_the_beam(rig):
    ctrl, host, _ = rig
    host.hello()
    load(host, program(cumulative=[0.0, 400.0], rate=400))
    host.request("BEAM_ON", {}, "BEAM_STARTED")
    host.wait_for("METERSET")
    host.auto_ack = False  # nothing more from the host
    t0 = time.monotonic()
    assert host.closed.wait(3.0)
    assert time.monotonic() - t0 <= 2.5
    record = ctrl.deliveries[-1]
    assert (record.termination, record.code) == ("MACHINE", "LINK")
    assert record.measured < 400


# ----------------------------------------------------------------------------- couch --


def test_move_couch_reads_back_per_axis(rig):
    ctrl, host, _ = rig
    before = host.hello()["couch"]
    asked = move(lateral_mm=-4.0, longitudinal_mm=45, vertical_mm=-1.5, yaw_deg=0.5, roll_deg=-1)
    mark = host.mark()
    name, after = host.request("MOVE_COUCH", asked, "COUCH_POSITION")
    assert name == "COUCH_POSITION"
    for axis in COUCH_AXES:
        assert after[axis] - before[axis] == pytest.approx(asked[axis], abs=1e-6)
    assert any("done" in f[3] for f in host.since(mark, "PROGRESS"))
    name, again = host.request("MOVE_COUCH", move(longitudinal_mm=-2.5), "COUCH_POSITION")
    assert again["longitudinal_mm"] == pytest.approx(42.5)
    assert ctrl.couch_position() == again
    for bad in (move(vertical_mm=50.5), move(pitch_deg=-3.5)):
        name, error = host.request("MOVE_COUCH", bad, "COUCH_POSITION")
        assert (name, error["code"]) == ("ERROR", "LIMIT")
    _, state = host.request("GET_STATE", {}, "STATE")
    assert state["couch"] == again  # nothing moved


def _rx(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rz(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# HFS: lateral = x, longitudinal = z, vertical = -y (columns: the table-top axes in LPS)
HFS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def test_couch_moves_are_rigid_motions_and_fields_axes_of_their_own():
    # a sphere 60 mm lateral of the isocentre, the patient lying as planned
    centre = np.array([60.0, 0.0, 0.0])
    anatomy = _sphere_anatomy(centre, (0.0, 0.0, 0.0))
    no_setup = {"setup_translation_mm": (0, 0, 0), "setup_rotation_deg": (0, 0, 0)}
    with IndependentController(time_scale=0.01, anatomy=anatomy, **no_setup) as ctrl:
        host = MiniHost.tcp(ctrl.serve_tcp())
        try:
            host.hello()
            moves = [
                move(lateral_mm=20.0),
                move(yaw_deg=2.0),  # about the isocentre: the 20 mm swing round with it
                move(longitudinal_mm=-3.0, pitch_deg=1.0),  # rotation first, then translation
            ]
            r, d = np.eye(3), np.zeros(3)  # the table top's motion, table-top axes
            for body in moves:
                name, position = host.request("MOVE_COUCH", body, "COUCH_POSITION")
                assert name == "COUCH_POSITION"
                step_r = _rz(body["yaw_deg"]) @ _rx(body["pitch_deg"])
                step_d = np.array([body["lateral_mm"], body["longitudinal_mm"], 0.0])
                r, d = step_r @ r, step_r @ d + step_d
            # each field an axis of its own: the sum of what was asked of it
            assert position == {
                **dict.fromkeys(COUCH_AXES, 0.0),
                **{"lateral_mm": 20.0, "longitudinal_mm": -3.0, "pitch_deg": 1.0, "yaw_deg": 2.0},
            }
            # the pose: the moves composed (not the summed fields as one move)
            pose_r, pose_t = ctrl.patient_pose()
            assert pose_r == pytest.approx(HFS @ r @ HFS.T, abs=1e-9)
            assert pose_t == pytest.approx(HFS @ d, abs=1e-9)
            summed = np.array([20.0, -3.0, 0.0])
            assert np.linalg.norm(d - summed) > 0.5  # the two readings differ
            # and the CBCT shows the sphere where that rigid motion put it
            geometry, hu, _ = acquire_cbct(host)
            expected = HFS @ (r @ (HFS.T @ centre) + d)
            assert _bright_centroid(geometry, hu) == pytest.approx(expected, abs=0.6)
        finally:
            host.close()


def test_couch_without_rotation_refuses_rotations():
    with IndependentController(
        time_scale=SCALE, capabilities={"couch_rotation_limits_deg": 0}
    ) as c:
        host = MiniHost.tcp(c.serve_tcp())
        try:
            assert host.hello()["capabilities"]["couch_rotation_limits_deg"] == 0
            _name, error = host.request("MOVE_COUCH", move(yaw_deg=0.1), "COUCH_POSITION")
            assert error["code"] == "LIMIT"
        finally:
            host.close()


# ---------------------------------------------------------------------------- images --


def _reassemble(host: MiniHost, mark: int) -> tuple[dict[str, Any], np.ndarray, list]:
    frames = host.since(mark, "IMAGES")
    first = frames[0][3]
    geometry = {k: v for k, v in first.items() if k not in ("first_plane", "planes")}
    planes: list[np.ndarray] = []
    for _, _, _, body in frames:
        assert {k: v for k, v in body.items() if k not in ("first_plane", "planes")} == geometry
        assert body["first_plane"] == len(planes)
        for text in body["planes"]:
            raw = base64.b64decode(text)
            assert len(raw) == body["rows"] * body["columns"] * 2
            planes.append(np.frombuffer(raw, dtype="<u2").reshape(body["rows"], body["columns"]))
        assert len(body_bytes(body)) <= 1 << 20
    assert len(planes) == first["planes_total"]
    hu = np.stack(planes).astype(float) - 1024.0
    return geometry, hu, frames


def acquire_cbct(host: MiniHost, timeout: float = 10.0):
    mark = host.mark()
    host.send("ACQUIRE", {"kind": "CBCT"})
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no CBCT"
        images = host.since(mark, "IMAGES")
        if images and sum(len(f[3]["planes"]) for f in images) >= images[0][3]["planes_total"]:
            break
        errors = host.since(mark, "ERROR")
        assert not errors, errors
        time.sleep(0.02)
    geometry, hu, frames = _reassemble(host, mark)
    progress = host.since(mark, "PROGRESS")
    assert progress and all(0 <= f[3]["done"] <= 1 for f in progress)
    assert all(f[0] <= frames[0][0] for f in progress)  # PROGRESS stops with the first IMAGES
    with host.cond:
        host.cursor = len(host.frames)
    return geometry, hu, frames


@pytest.mark.parametrize("rig", [{"max_planes_per_frame": 5, "time_scale": 0.02}], indirect=True)
def test_acquire_returns_fragments_with_the_stated_geometry(rig):
    _, host, _ = rig
    host.hello()
    geometry, hu, frames = acquire_cbct(host)
    assert len(frames) == 5  # 24 planes, 5 a frame
    assert geometry == {
        "kind": "CBCT",
        "encoding": "uint16le-hu1024",
        "rows": 64,
        "columns": 64,
        "planes_total": 24,
        "pixel_spacing": 6.0,
        "slice_spacing": 2.5,
        "origin": [-189.0, -189.0, -28.75],
    }
    assert hu.shape == (24, 64, 64)
    assert hu[:, 32, 2:6].mean() < -900  # air beside the water cylinder (x = -177..-159 mm)
    assert abs(hu[:, 32, 29:35].mean()) < 20  # water in the middle


def test_acquire_in_one_frame_when_it_fits():
    with IndependentController(time_scale=0.02) as ctrl:
        host = MiniHost.tcp(ctrl.serve_tcp())
        try:
            host.hello()
            _, hu, frames = acquire_cbct(host)
            assert len(frames) == 1 and hu.shape == (24, 64, 64)
        finally:
            host.close()


def _sphere_anatomy(centre_ct, iso_ct):
    spacing = (2.0, 2.0, 2.0)
    origin = (-150.0, -150.0, -80.0)
    z, y, x = np.meshgrid(
        origin[2] + 2.0 * np.arange(81),
        origin[1] + 2.0 * np.arange(151),
        origin[0] + 2.0 * np.arange(151),
        indexing="ij",
    )
    vol = np.full(z.shape, -1000.0, dtype=np.float32)
    r2 = (x - centre_ct[0]) ** 2 + (y - centre_ct[1]) ** 2 + (z - centre_ct[2]) ** 2
    vol[r2 <= 22.0**2] = 1000.0
    return vol, origin, spacing


def _bright_centroid(geometry, hu, low: float = -1000.0, high: float = 1000.0) -> np.ndarray:
    """The centre (LPS) of what is brighter than ``low``, by partial-volume weight."""
    weights = np.clip((hu - low) / (high - low), 0.0, 1.0)
    weights[weights < 0.05] = 0.0
    k, j, i = np.nonzero(weights)
    w = weights[k, j, i]
    ox, oy, oz = geometry["origin"]
    ps, ss = geometry["pixel_spacing"], geometry["slice_spacing"]
    return np.array(
        [
            np.average(ox + i * ps, weights=w),
            np.average(oy + j * ps, weights=w),
            np.average(oz + k * ss, weights=w),
        ]
    )


def _euler_xyz(r: np.ndarray) -> tuple[float, float, float]:
    """Angles (about X, Y, Z, degrees) of r = Rz Ry Rx."""
    ay = -math.asin(max(-1.0, min(1.0, r[2, 0])))
    ax = math.atan2(r[2, 1], r[2, 2])
    az = math.atan2(r[1, 0], r[0, 0])
    return math.degrees(ax), math.degrees(ay), math.degrees(az)


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_cbct_shows_the_setup_error_and_the_couch_correction_removes_it(position):
    iso_ct = np.array([10.0, -20.0, 5.0])
    centre_ct = iso_ct + np.array([30.0, 25.0, 4.0])
    anatomy = _sphere_anatomy(centre_ct, iso_ct)
    with IndependentController(
        time_scale=0.01, patient_position=position, anatomy=anatomy, isocenter=iso_ct
    ) as ctrl:
        host = MiniHost.tcp(ctrl.serve_tcp())
        try:
            host.hello()
            geometry, hu, _ = acquire_cbct(host)
            # planning-CT coordinates: the grid centred on where the rig puts the isocentre
            assert geometry["origin"] == pytest.approx(iso_ct + GRID_ORIGIN)
            u = centre_ct - iso_ct
            r0 = extrinsic_xyz(0.8, -0.6, 1.2)
            t0 = np.array([3.0, -2.0, 1.5])
            seen = _bright_centroid(geometry, hu)
            assert seen == pytest.approx(iso_ct + r0 @ u + t0, abs=0.6)
            assert np.linalg.norm(seen - centre_ct) > 3.0
            # the host's correction, LPS, converted to table-top axes for the position
            r_fix = r0.T
            d_fix = -r0.T @ t0
            m = IEC_TO_LPS[position]
            pitch, roll, yaw = _euler_xyz(m.T @ r_fix @ m)
            lateral, longitudinal, vertical = lps_to_table_top(d_fix, position)
            body = move(
                lateral_mm=lateral,
                longitudinal_mm=longitudinal,
                vertical_mm=vertical,
                pitch_deg=pitch,
                roll_deg=roll,
                yaw_deg=yaw,
            )
            name, _ = host.request("MOVE_COUCH", body, "COUCH_POSITION")
            assert name == "COUCH_POSITION"
            geometry, hu, _ = acquire_cbct(host)
            assert _bright_centroid(geometry, hu) == pytest.approx(centre_ct, abs=0.6)
            # and the documented axis mapping, translation only
            expected = {"HFS": (1, 3, -2), "HFP": (-1, 3, 2), "FFS": (-1, -3, -2)}
            expected["FFP"] = (1, -3, 2)
            got = lps_to_table_top([1.0, 2.0, 3.0], position)
            assert got == pytest.approx(expected[position])
        finally:
            host.close()


def _smooth_anatomy():
    """A planning CT whose grid does not start at 0, with smooth structure (two Gaussian
    blobs and a gradient): every voxel of a CBCT can be compared with it."""
    spacing = np.array([3.0, 2.5, 2.0])
    origin = np.array([-231.0, -187.5, -71.0])
    shape = (80, 160, 150)  # z, y, x
    z, y, x = np.meshgrid(
        *(origin[a] + spacing[a] * np.arange(shape[2 - a]) for a in (2, 1, 0)), indexing="ij"
    )
    hu = -200.0 + 0.8 * x - 0.5 * y + 1.5 * z
    hu += 900.0 * np.exp(-((x - 40) ** 2 + (y + 30) ** 2 + (z - 12) ** 2) / (2 * 18.0**2))
    hu -= 600.0 * np.exp(-((x + 70) ** 2 + (y - 50) ** 2 + (z + 5) ** 2) / (2 * 25.0**2))
    return hu.astype(np.float32), origin, spacing


def _planning_ct_at(volume, origin, spacing, geometry) -> np.ndarray:
    """The planning CT at the voxel centres an IMAGES geometry names (planning-CT LPS)."""
    from scipy import ndimage

    ox, oy, oz = geometry["origin"]
    ps, ss = geometry["pixel_spacing"], geometry["slice_spacing"]
    n, rows, cols = geometry["planes_total"], geometry["rows"], geometry["columns"]
    z, y, x = np.meshgrid(
        oz + ss * np.arange(n), oy + ps * np.arange(rows), ox + ps * np.arange(cols), indexing="ij"
    )
    coords = np.stack(
        [(z - origin[2]) / spacing[2], (y - origin[1]) / spacing[1], (x - origin[0]) / spacing[0]]
    )
    return ndimage.map_coordinates(volume, coords, order=1, mode="nearest")


@pytest.mark.parametrize("isocenter", [None, (12.0, -8.0, 6.0)])
def test_cbct_of_a_patient_lying_as_planned_is_the_planning_ct(isocenter):
    # no setup error, no couch move: the CBCT comes out in the planning CT's coordinates,
    # voxel for voxel the planning CT there (registering the two gives the identity)
    volume, origin, spacing = _smooth_anatomy()
    with IndependentController(
        time_scale=0.01,
        anatomy=(volume, origin, spacing),
        isocenter=isocenter,
        setup_translation_mm=(0.0, 0.0, 0.0),
        setup_rotation_deg=(0.0, 0.0, 0.0),
    ) as ctrl:
        host = MiniHost.tcp(ctrl.serve_tcp())
        try:
            host.hello()
            geometry, hu, _ = acquire_cbct(host)
        finally:
            host.close()
    # the machine's isocentre at the planning CT's origin, unless the rig puts it elsewhere
    iso = np.zeros(3) if isocenter is None else np.array(isocenter)
    assert geometry["origin"] == pytest.approx(iso + GRID_ORIGIN)
    expected = _planning_ct_at(volume, origin, spacing, geometry)
    inside = np.ones(hu.shape, dtype=bool)  # the CBCT field of view inside the planning CT
    ox, oy, oz = geometry["origin"]
    xs = ox + geometry["pixel_spacing"] * np.arange(geometry["columns"])
    ys = oy + geometry["pixel_spacing"] * np.arange(geometry["rows"])
    inside &= (xs >= origin[0])[None, None, :] & (xs <= origin[0] + 3.0 * 149)[None, None, :]
    inside &= (ys >= origin[1])[None, :, None] & (ys <= origin[1] + 2.5 * 159)[None, :, None]
    assert inside.mean() > 0.6
    difference = (hu - expected)[inside]
    # the imager's noise only (4 HU), unbiased
    assert abs(difference.mean()) < 0.15 and difference.std() < 5.0
    # the comparison pins the geometry: a 1 mm error in any axis shows as a bias through
    # the anatomy's gradient (0.8, -0.5, 1.5 HU/mm)
    for axis in range(3):
        wrong = [ox, oy, oz]
        wrong[axis] += 1.0
        off = _planning_ct_at(volume, origin, spacing, {**geometry, "origin": wrong})
        assert abs((hu - off)[inside].mean()) > 0.35


def _write_ct_series(directory: Path, iso: list[float]) -> np.ndarray:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTPlanStorage, generate_uid

    series = generate_uid()
    study = generate_uid()
    frame = generate_uid()
    rows = cols = 96
    spacing = 3.0
    origin = np.array([-142.5, -142.5 + 20.0, -60.0])
    centre = np.array(iso) + np.array([-25.0, 15.0, 10.0])
    for k in range(41):
        z = origin[2] + 3.0 * k
        y, x = np.meshgrid(
            origin[1] + spacing * np.arange(rows),
            origin[0] + spacing * np.arange(cols),
            indexing="ij",
        )
        hu = np.where((x / 120) ** 2 + (y - 20) ** 2 / 90**2 <= 1, 0.0, -1000.0)
        hu[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 20.0**2] = 1200.0
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu + 1024).astype("<u2").tobytes()
        ds.save_as(directory / f"ct{40 - k:03d}.dcm", enforce_file_format=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTPlanStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plan = Dataset()
    plan.file_meta = meta
    plan.SOPClassUID, plan.SOPInstanceUID = RTPlanStorage, meta.MediaStorageSOPInstanceUID
    plan.Modality = "RTPLAN"
    cp = Dataset()
    cp.IsocenterPosition = [float(v) for v in iso]
    beam = Dataset()
    beam.ControlPointSequence = pydicom.Sequence([cp])
    plan.BeamSequence = pydicom.Sequence([beam])
    plan.save_as(directory / "plan.dcm", enforce_file_format=True)
    return centre


def test_anatomy_from_a_dicom_ct_directory(tmp_path):
    iso = [5.0, 10.0, -4.0]
    centre = _write_ct_series(tmp_path, iso)
    # version 2 carries no isocentre: the plan's is used only when the rig says so
    with IndependentController(time_scale=0.01, anatomy=tmp_path, isocenter="plan") as ctrl:
        assert ctrl.anatomy.isocenter.tolist() == iso
    with IndependentController(time_scale=0.01, anatomy=tmp_path) as ctrl:
        assert ctrl.anatomy.isocenter.tolist() == [0.0, 0.0, 0.0]
        assert ctrl.anatomy.plan_isocenter.tolist() == iso
        host = MiniHost.tcp(ctrl.serve_tcp())
        try:
            host.hello()
            geometry, hu, _ = acquire_cbct(host)
            assert geometry["origin"] == [-189.0, -189.0, -28.75]
            r0 = extrinsic_xyz(0.8, -0.6, 1.2)
            expected = r0 @ centre + np.array([3.0, -2.0, 1.5])  # planning-CT coordinates
            seen = _bright_centroid(geometry, hu, low=0.0, high=1200.0)
            assert seen == pytest.approx(expected, abs=0.8)
            water = hu[:, 20:24, 30:34]
            assert abs(water.mean()) < 15 and 1.0 < water.std() < 10  # a little noise
        finally:
            host.close()


# -------------------------------------------------------------------------- the link --


def test_garbled_and_out_of_order_frames_get_nak_with_the_expected_seq(rig):
    _, host, _ = rig
    host.hello()
    host.request("GET_STATE", {}, "STATE")  # host seq 1; the controller expects 2 next
    good = encode_payload("GET_STATE", 2, {})
    garbage = [
        cobs_encode(good[:-1] + bytes([good[-1] ^ 0x40])) + b"\x00",  # CRC
        b"\x07\x01\x02\x00",  # COBS block past the end
        cobs_encode(good[:6]) + b"\x00",  # too short
        cobs_encode(encode_payload("GET_STATE", 2, b"{nope")) + b"\x00",  # JSON
        encode_frame("GET_STATE", 9, {}),  # out of order (ahead)
    ]
    for wire in garbage:
        mark = host.link_mark()
        frames_before = host.mark()
        host.write(wire)
        _, _kind, seq, body = host.wait_link("NAK", mark)
        assert seq == 2, body
        assert schema_problems("NAK", body) == []
        assert host.since(frames_before) == []  # never partly used
    name, _ = host.request("GET_STATE", {}, "STATE")
    assert name == "STATE"


def test_duplicate_is_acked_again_and_not_processed(rig):
    _, host, _ = rig
    host.hello()
    seq = host.send("GET_STATE", {})
    host.wait_for("STATE")
    mark, link_mark = host.mark(), host.link_mark()
    host.write(encode_frame("GET_STATE", seq, {}))
    _, _kind, acked, _ = host.wait_link("ACK", link_mark)
    assert acked == seq
    time.sleep(0.3)
    assert host.since(mark) == []
    assert host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")[0] == "HEARTBEAT_REPLY"


def test_controller_retransmits_five_times_then_drops_the_link(rig):
    _ctrl, host, _ = rig
    host.auto_ack = False
    host.write(encode_frame("HELLO", 0, {"protocol": 2}))
    t0 = time.monotonic()
    assert host.closed.wait(3.0)
    replies = [f for f in host.frames if f[1] == "HELLO_REPLY"]
    assert len(replies) == 6 and {f[2] for f in replies} == {0}
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(replies)]
    assert all(0.17 <= g <= 0.35 for g in gaps), gaps
    assert 1.1 <= time.monotonic() - t0 <= 2.0


def test_nak_makes_the_controller_resend_at_once(rig):
    _, host, _ = rig
    host.auto_ack = False
    host.write(encode_frame("HELLO", 0, {"protocol": 2}))
    deadline = time.monotonic() + 1
    while not host.frames and time.monotonic() < deadline:
        time.sleep(0.005)
    t_first = host.frames[0][0]
    host.write(encode_frame("NAK", 0, {"reason": "CRC mismatch"}))
    while len(host.frames) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert host.frames[1][1] == "HELLO_REPLY" and host.frames[1][0] - t_first < 0.15
    host.write(encode_frame("ACK", 0, {}))


def test_sequence_numbers_wrap_in_both_directions(rig):
    ctrl, host, _ = rig
    host.hello()
    link = ctrl._link
    with link._cond:
        link.expected = 65535
        link.next_seq = 65535
    with host.cond:
        host.expected = 65535
    host.next_seq = 65535
    assert host.request("GET_STATE", {}, "STATE")[0] == "STATE"
    assert host.request("GET_STATE", {}, "STATE")[0] == "STATE"
    seqs = [f[2] for f in host.frames[-2:]]
    assert seqs == [65535, 0] and host.next_seq == 1


def test_pty_line_stays_up_across_host_sessions():
    with IndependentController(time_scale=SCALE) as ctrl:
        path = ctrl.serve_pty()
        for session in (1, 2):
            host = MiniHost.serial(path)
            try:
                assert host.hello()["protocol"] == 2
                _, beat = host.request("HEARTBEAT", {}, "HEARTBEAT_REPLY")
                assert beat["sessions"] == session
                _name, after = host.request("MOVE_COUCH", move(vertical_mm=2.0), "COUCH_POSITION")
                assert after["vertical_mm"] == pytest.approx(2.0 * session)
                assert host.problems == []
            finally:
                host.close()


# ------------------------------------------------------------------------ fault knobs --


def test_trip_interlock(rig):
    ctrl, host, _ = rig
    host.hello()
    ctrl.trip_interlock(beam=4, meterset=42.6, code="DOOR")
    load(host, program(beam=4))
    _, between, ended = deliver(host)
    assert ended["termination"] == "MACHINE" and ended["code"] == "DOOR"
    assert ended["reason"] == "treatment room door opened"
    assert 42.6 <= ended["meterset"] < 43.6
    assert [f[3]["index"] for f in between if f[1] == "CONTROL_POINT"] == []
    assert ctrl.deliveries[-1].code == "DOOR"
    # the interlock was for that beam-on; the continuation runs to its end
    load(host, program(beam=4, start=ended["meterset"]))
    _, between, ended = deliver(host)
    assert ended["termination"] == "NORMAL"
    assert [f[3]["index"] for f in between if f[1] == "CONTROL_POINT"] == [1, 2]


def test_drop_link(rig):
    ctrl, host, address = rig
    host.hello()
    load(host, program(cumulative=[0.0, 400.0], rate=400))
    host.request("BEAM_ON", {}, "BEAM_STARTED")
    host.wait_for("METERSET")
    ctrl.drop_link(down_s=0.5)
    assert host.closed.wait(1.0)
    record = ctrl.deliveries[-1]
    assert (record.termination, record.code) == ("MACHINE", "LINK")
    time.sleep(0.6)
    again = MiniHost.tcp(address)
    try:
        last = again.hello()["last_delivery"]
        assert (last["termination"], last["code"]) == ("MACHINE", "LINK")
        assert last["reason"] and last["reason"] == record.reason  # words, as it stopped
        assert last["measured"] == record.measured < 400
    finally:
        again.close()


def test_stall(rig):
    ctrl, host, _ = rig
    host.hello()
    ctrl.stall(0.6)
    t0 = time.monotonic()
    mark = host.link_mark()
    name, _ = host.request("GET_STATE", {}, "STATE")  # retransmitted until the stall ends
    assert name == "STATE"
    assert time.monotonic() - t0 >= 0.55
    assert next(f for f in host.link_frames[mark:] if f[1] == "ACK")[0] - t0 >= 0.55


def test_stall_with_the_beam_on_past_2_s_stops_the_beam(rig):
    # nothing reaches the controller for 2 s with the beam on: it has lost its host
    ctrl, host, _ = rig
    host.hello()
    load(host, program(cumulative=[0.0, 600.0], rate=300))  # 120 s machine, 6 s here
    host.request("BEAM_ON", {}, "BEAM_STARTED")
    host.wait_for("METERSET")
    t0 = time.monotonic()
    ctrl.stall(3.0)
    with heartbeats(host):
        while ctrl.deliveries[-1].termination == "" and time.monotonic() - t0 < 3.0:
            time.sleep(0.02)
    record = ctrl.deliveries[-1]
    assert 1.9 <= time.monotonic() - t0 <= 2.4
    assert (record.termination, record.code) == ("MACHINE", "LINK")
    assert record.measured < 600


def test_couch_stops_short(rig):
    ctrl, host, _ = rig
    host.hello()
    ctrl.couch_stops_short("longitudinal", 10.0, moves=1)
    _, first = host.request(
        "MOVE_COUCH", move(longitudinal_mm=12.0, lateral_mm=1), "COUCH_POSITION"
    )
    assert first["longitudinal_mm"] == pytest.approx(2.0)
    assert first["lateral_mm"] == pytest.approx(1.0)
    _, rest = host.request("MOVE_COUCH", move(longitudinal_mm=10.0), "COUCH_POSITION")
    assert rest["longitudinal_mm"] == pytest.approx(12.0)
    ctrl.couch_stops_short("yaw_deg", 0.4)  # every move, until cleared
    for _ in range(2):
        _, pos = host.request("MOVE_COUCH", move(yaw_deg=1.0), "COUCH_POSITION")
    assert pos["yaw_deg"] == pytest.approx(1.2)
    assert ctrl.couch_position() == pos


def test_overrun(rig):
    ctrl, host, _ = rig
    host.hello()
    ctrl.overrun(3.0)
    load(host, program())
    _, between, ended = deliver(host)
    assert ended["termination"] == "NORMAL"
    assert 103.0 <= ended["meterset"] < 104.0
    metersets = [f[3]["meterset"] for f in between if f[1] == "METERSET"]
    assert metersets == sorted(metersets)
    assert ctrl.deliveries[-1].measured == ended["meterset"]


def test_cp_index_from_zero(rig):
    ctrl, host, _ = rig
    ctrl._test_nonconformant = True
    host.hello()
    ctrl.cp_index_from_zero(True)
    load(host, program(cumulative=[0.0, 30.0, 60.0, 100.0]))
    _, between, _ = deliver(host)
    indices = [f[3]["index"] for f in between if f[1] == "CONTROL_POINT"]
    assert indices == [0, 1, 2]
    assert any("minimum" in p for p in host.problems)  # index 0 breaks the schema
    host.problems.clear()


def test_swap_long_vert(rig):
    ctrl, host, _ = rig
    host.hello()
    ctrl.swap_long_vert(True)
    _, pos = host.request(
        "MOVE_COUCH", move(longitudinal_mm=8.0, vertical_mm=-3.0), "COUCH_POSITION"
    )
    assert pos["longitudinal_mm"] == pytest.approx(-3.0)
    assert pos["vertical_mm"] == pytest.approx(8.0)


# ------------------------------------------------------------------------------- CLI --


def test_cli_prints_where_it_listens():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.peers.controller",
            "--tcp",
            "127.0.0.1:0",
            "--time-scale",
            "0.1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"controller listening on tcp://([\d.]+):(\d+)", line)
        assert match, line
        host = MiniHost.tcp((match.group(1), int(match.group(2))))
        try:
            assert host.hello()["protocol"] == 2
        finally:
            host.close()
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stdout.close()
