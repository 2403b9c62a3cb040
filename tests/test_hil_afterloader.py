"""The HDR afterloader on the wire (hil/PROTOCOL.md, Afterloader): `tdw-emu hil
controller-sim --machine afterloader` in its own process, over a socat pty pair and over
TCP, driven by the host's RemoteAfterloader and judged by `tdw-emu hil check`.

- A two-channel programme is treated, and what the host records is what the machine
  measured, dwell by dwell.
- The door opening 2 s into channel 2 ends it MACHINE (DOOR) with fewer seconds than
  specified, and DWELL_DONE for exactly the dwells finished; TREAT is refused while the
  door stays open.
- A dwell outside the machine's limits is refused before anything moves.
- A link lost with the source out: the controller retracts it and the host takes its
  count; a controller that cannot be read back leaves the channel UNKNOWN at the seconds
  last heard, never more.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from devices import schemas
from devices.afterloader import (
    ChannelEnded,
    ChannelProgramme,
    ChannelTick,
    Dwell,
    DwellDone,
)
from devices.base import DeviceError, Termination
from devices.clock import Clock
from devices.protocol import Frame, FrameReader, MessageType, encode
from devices.registry import open_device
from devices.remote import ControllerRefused, DeviceUrl, RemoteAfterloader, RemoteMachine
from hil.faults import send_fault
from tests.conftest import REPO
from tests.hil_bench import controller_process, socat_pair

LINKS = ["pty", "tcp"]
SCALE = "0.1"  # a channel of three 1.5 s dwells takes about 1.2 s


@pytest.fixture(params=LINKS)
def afterloader(request, tmp_path) -> Iterator[tuple[str, tuple[str, int], object]]:
    """`tdw-emu hil controller-sim --machine afterloader` on a socat pty pair or TCP: (the
    device URL a host drives it by, its control channel, the process)."""
    socat = None
    if request.param == "pty":
        socat, host_end, controller_end = socat_pair(tmp_path)
        controller, url = controller_process(
            "--serial", str(controller_end), "--machine", "afterloader",
            "--time-scale", SCALE, host_end=host_end,
        )  # fmt: skip
    else:
        controller, url = controller_process(
            "--tcp", "127.0.0.1:0", "--machine", "afterloader", "--time-scale", SCALE
        )
    control = DeviceUrl.parse(url.partition(":")[2].removeprefix("//")).control
    try:
        yield url, control, controller
    finally:
        controller.stop()
        if socat is not None:
            socat.terminate()
            socat.wait(timeout=10)


def _channel(number: int, seconds: float = 1.5, dwells: int = 3) -> ChannelProgramme:
    return ChannelProgramme(
        number, 1200.0, tuple(Dwell(i, 20.0 - 5.0 * i, seconds) for i in range(dwells))
    )


def _treated(machine: RemoteAfterloader) -> tuple[list[ChannelTick], list[DwellDone], ChannelEnded]:
    ticks, done, ended = [], [], None
    for event in machine.treat():
        assert ended is None, f"{event} after ChannelEnded"
        if isinstance(event, ChannelTick):
            ticks.append(event)
        elif isinstance(event, DwellDone):
            done.append(event)
        else:
            ended = event
    assert ended is not None
    return ticks, done, ended


def _measured(control: tuple[str, int]) -> list[dict]:
    """Every channel the controller treated, as its machine measured it."""
    return send_fault(control, {"fault": "status"})["controller"]["channels"]


@pytest.mark.timeout(120)
def test_a_two_channel_programme_is_treated_as_measured(afterloader):
    url, control, _ = afterloader
    machine = open_device(url, Clock(0))
    assert type(machine) is RemoteMachine  # no hint: HELLO_REPLY says what it drives
    started = time.monotonic()
    with machine:
        assert isinstance(machine, RemoteAfterloader)
        status = machine.source_status()
        assert (status.source.isotope, status.position, status.door) == ("Ir-192", "safe", "closed")
        limits = machine.afterloader_limits()
        assert (limits.channels, limits.max_dwell_s) == (18, 600.0)
        programmes = [_channel(1, 1.5), _channel(2, 2.0, dwells=2)]
        for programme in programmes:
            machine.load_channel(programme)
            ticks, done, ended = _treated(machine)
            assert [d.index for d in done] == [d.index for d in programme.dwells]
            for reported, dwell in zip(done, programme.dwells, strict=True):
                assert reported.position_mm == dwell.position_mm
                assert reported.delivered_s == pytest.approx(dwell.time_s, abs=1e-6)
            assert ended.termination == Termination.NORMAL
            assert (ended.code, ended.dwell) == ("", None)
            assert ended.delivered_s == pytest.approx(programme.total_s, abs=1e-6)
            counts = [t.delivered_s for t in ticks]
            assert counts == sorted(counts) and counts[-1] <= ended.delivered_s + 1e-6
        assert machine.source_status().position == "safe"
    took = time.monotonic() - started
    truth = _measured(control)
    assert [(c["channel"], c["termination"], c["delivered_s"]) for c in truth] == [
        (1, "NORMAL", 4.5),
        (2, "NORMAL", 4.0),
    ]
    assert [len(c["dwells"]) for c in truth] == [3, 2]
    assert took < 15, f"{took:.1f} s at time scale {SCALE}"


@pytest.mark.timeout(120)
def test_the_door_opening_2_s_into_channel_2_ends_it_with_the_dwells_finished(afterloader):
    url, control, _ = afterloader
    door = {"fault": "door", "channel": 2, "seconds": 2.0, "open_s": 15.0}
    assert send_fault(control, door)["ok"]
    with open_device(url, Clock(0), {"machine": "afterloader"}) as machine:
        assert isinstance(machine, RemoteAfterloader)
        machine.load_channel(_channel(1))
        assert _treated(machine)[2].termination == Termination.NORMAL
        second = _channel(2)
        machine.load_channel(second)
        ticks, done, ended = _treated(machine)
        # 1.5 s at dwell 0, then the door at 2.0 s: 0.5 s into dwell 1, which never finished.
        assert [d.index for d in done] == [0]
        assert done[0].delivered_s == pytest.approx(1.5)
        assert (ended.termination, ended.code, ended.dwell) == (Termination.MACHINE, "DOOR", 1)
        assert ended.delivered_s == pytest.approx(2.0)
        assert ended.delivered_s < second.total_s
        assert max(t.delivered_s for t in ticks) <= ended.delivered_s + 1e-6
        assert machine.door == "open"  # the DOOR event came before CHANNEL_ENDED
        # TREAT is refused INTERLOCK while the door is open; the host asks again, the
        # channel still loaded, until it is closed (as a console waits for the room).
        machine.load_channel(_channel(3))
        assert machine.source_status().door == "open"
        assert _treated(machine)[2].termination == Termination.NORMAL
        assert machine.source_status().door == "closed"
    truth = _measured(control)
    assert [(c["channel"], c["termination"], c["code"]) for c in truth] == [
        (1, "NORMAL", ""),
        (2, "MACHINE", "DOOR"),
        (3, "NORMAL", ""),
    ]
    assert [d["index"] for d in truth[1]["dwells"]] == [0]


@pytest.mark.timeout(120)
def test_a_dwell_outside_the_limits_is_refused_before_anything_moves(afterloader):
    url, control, _ = afterloader
    with open_device(url, Clock(0), {"machine": "afterloader"}) as machine:
        too_long = ChannelProgramme(4, 1200.0, (Dwell(0, 20.0, 1.0), Dwell(1, 15.0, 700.0)))
        with pytest.raises(ControllerRefused, match=r"LIMIT.*700\.0 s is outside"):
            machine.load_channel(too_long)
        with pytest.raises(DeviceError, match="no channel loaded"):
            list(machine.treat())
        status = machine.source_status()
        assert (status.position, status.door) == ("safe", "closed")
    assert _measured(control) == []  # no treatment began: no source moved


@pytest.mark.timeout(120)
def test_a_link_dropped_with_the_source_out_ends_at_the_controllers_count(afterloader):
    url, control, _ = afterloader
    with open_device(url, Clock(0), {"machine": "afterloader"}) as machine:
        machine.load_channel(_channel(5, 20.0, dwells=2))
        events, dropped = [], False
        for event in machine.treat():
            events.append(event)
            if isinstance(event, ChannelTick) and event.delivered_s >= 3.0 and not dropped:
                assert send_fault(control, {"fault": "drop"})["ok"]
                dropped = True
        heard = max(e.delivered_s for e in events if isinstance(e, ChannelTick))
        ended = events[-1]
        assert isinstance(ended, ChannelEnded)
        [truth] = _measured(control)
        assert (truth["termination"], truth["code"]) == ("MACHINE", "LINK")
        assert (ended.termination, ended.code) == (Termination.MACHINE, "LINK")
        assert ended.delivered_s == truth["delivered_s"]  # the controller's own count
        assert heard - 1e-6 <= ended.delivered_s < 40.0
        assert "the controller counted" in ended.reason
        assert machine.reconnects >= 1
        assert machine.source_status().position == "safe"


# Each fault by its AfterloaderFaults name on the control channel, and the channel it hits.
FAULTS = [
    ({"fault": "power", "channel": 7, "seconds": 2.5}, 7),
    ({"fault": "stuck", "channel": 8, "seconds": 3.0}, 8),
    ({"fault": "obstructed", "channel": 9}, 9),
    ({"fault": "door", "channel": 10, "seconds": 1.5, "open_s": 0.5}, 10),
]


@pytest.mark.timeout(120)
def test_the_wire_treats_each_fault_as_the_simulated_afterloader_does():
    """hil/afterloader_sim.py is SimulatedAfterloader behind the protocol: with the same
    fault, the host hears the same dwells and the same end as the in-process machine gives."""
    from devices.sim.afterloader import AfterloaderFaults, SimulatedAfterloader
    from devices.sim.linac import load_machine_profile

    controller, url = controller_process(
        "--tcp", "127.0.0.1:0", "--machine", "afterloader", "--time-scale", SCALE
    )
    control = DeviceUrl.parse(url.removeprefix("tcp://")).control
    options: dict = {"interlocks": {}, "afterloader_faults": {}}
    try:
        with open_device(url, Clock(0), {"machine": "afterloader"}) as machine:
            for command, channel in FAULTS:
                assert send_fault(control, command)["ok"]
                kind = command["fault"]
                given = options["afterloader_faults"]
                if kind == "obstructed":
                    given.setdefault(kind, []).append(channel)
                else:
                    given.setdefault(kind, {})[channel] = command["seconds"]
                programme = _channel(channel)
                machine.load_channel(programme)
                _, done, ended = _treated(machine)
                reference = SimulatedAfterloader(
                    load_machine_profile("afterloader"),
                    Clock(0),
                    AfterloaderFaults.from_options(options),
                )
                reference.connect()
                reference.load_channel(programme)
                events = list(reference.treat())
                assert done == [e for e in events if isinstance(e, DwellDone)], kind
                assert ended == events[-1], kind
                if kind == "door":  # wait for it to close before the next channel
                    deadline = time.monotonic() + 10
                    while machine.source_status().door == "open":
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
            machine.load_channel(_channel(11, 30.0, dwells=1))  # an operator's RETRACT
            for event in machine.treat():
                if isinstance(event, ChannelTick) and event.delivered_s >= 1.0:
                    machine.interrupt("the operator stopped it")
                elif isinstance(event, ChannelEnded):
                    retracted = event
        assert (retracted.termination, retracted.reason, retracted.code, retracted.dwell) == (
            Termination.OPERATOR,
            "the operator stopped it",
            "",
            0,
        )
        assert 1.0 <= retracted.delivered_s < 30.0
        codes = [(c["channel"], c["termination"], c["code"]) for c in _measured(control)]
        assert codes == [
            (7, "MACHINE", "POWER"),
            (8, "MACHINE", "RETRACT"),
            (9, "MACHINE", "OBSTRUCTION"),
            (10, "MACHINE", "DOOR"),
            (11, "OPERATOR", ""),
        ]
    finally:
        controller.stop()


@pytest.mark.timeout(120)
def test_a_controller_that_cannot_be_read_back_leaves_the_channel_unknown(tmp_path):
    controller, url = controller_process(
        "--tcp", "127.0.0.1:0", "--machine", "afterloader", "--time-scale", SCALE
    )
    try:
        with open_device(url + "&reconnect_s=1", Clock(0)) as machine:
            machine.load_channel(_channel(6, 30.0, dwells=1))
            heard = 0.0
            for event in machine.treat():
                if isinstance(event, ChannelTick):
                    heard = event.delivered_s
                    if heard >= 2.0 and controller.process.poll() is None:
                        controller.kill()
                elif isinstance(event, ChannelEnded):
                    ended = event
        assert (ended.termination, ended.code) == (Termination.UNKNOWN, "LINK")
        assert ended.delivered_s == heard  # the seconds last heard, never more
        assert "could not be confirmed" in ended.reason
    finally:
        controller.stop()


@pytest.mark.timeout(120)
def test_a_linac_host_is_refused_by_an_afterloader_in_one_sentence(afterloader):
    url, _, _ = afterloader
    machine = open_device(url + "&reconnect_s=1", Clock(0), {"machine": "tdd"})
    with pytest.raises(DeviceError, match="drives an afterloader; this device was configured"):
        machine.connect()


@pytest.mark.timeout(180)
def test_hil_check_passes_an_afterloader_controller(afterloader, tmp_path):
    url, _, _ = afterloader
    device = url.split("?", 1)[0]
    junit = tmp_path / "hil-check.xml"
    result = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "hil", "check", "--device", device,
         "--junit", str(junit)],
        capture_output=True, text=True, cwd=REPO, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    suite = ET.parse(junit).getroot()
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names == [
        "handshake and afterloader capabilities",
        "source status",
        "every message type",
        "NAK and retransmission",
        "heartbeat",
        "refusals before the source moves",
        "dwell numbering and measured times",
        "RETRACT during a channel",
        "source retracted when the host is lost",
    ]
    assert suite.get("failures") == "0"


def test_a_linac_controller_refuses_the_afterloaders_requests():
    from tests.hil_bench import start_controller

    spec, _, _ = start_controller("tcp", 0.0)
    machine = open_device(spec, Clock(0), {"machine": "afterloader"})
    with pytest.raises(DeviceError, match="drives a linac; this device was configured for an"):
        machine.connect()
    from devices.link import Link, SocketTransport

    host, port = spec.removeprefix("tcp://").split(":")
    link = Link(SocketTransport.connect(host, int(port)))
    try:
        link.send(MessageType.HELLO, {"protocol": 2})
        hello = link.recv(timeout=5)
        assert (hello.type, hello.body["machine"]) == (MessageType.HELLO_REPLY, "linac")
        link.send(MessageType.GET_SOURCE_STATUS, {})
        refused = link.recv(timeout=5)
        assert (refused.type, refused.body["code"], refused.body["request"]) == (
            MessageType.ERROR,
            "UNSUPPORTED",
            "GET_SOURCE_STATUS",
        )
    finally:
        link.close()


def test_the_afterloaders_example_frames_decode_and_follow_their_schemas():
    """hil/PROTOCOL.md's afterloader frames are real frames, as the linac's worked frames
    are (tests/test_protocol.py)."""
    text = (REPO / "hil" / "PROTOCOL.md").read_text()
    section = text[text.index("### Example frames of an afterloader") : text.index("## Versioning")]
    pairs = re.findall(r"^body  (\{.*\})\nwire  ((?:[0-9a-f]{2} )+00)$", section, re.MULTILINE)
    kinds = []
    for body_text, wire_text in pairs:
        wire = bytes.fromhex(wire_text)
        [frame] = FrameReader().feed(wire)
        assert frame.body == json.loads(body_text)
        assert schemas.problems(frame.type, frame.body) == [], frame
        assert encode(Frame(frame.type, frame.seq, frame.body)) == wire
        kinds.append(frame.type.name)
    assert kinds == ["LOAD_CHANNEL", "LOADED", "DWELL_DONE", "DOOR", "CHANNEL_ENDED"]


def test_hello_reply_schema_holds_each_machine_to_its_own_fields():
    from hil.controller_sim import ControllerSim

    linac = ControllerSim("linac", 0.0)._hello_body()
    afterloader = ControllerSim("afterloader", 0.0)._hello_body()
    assert schemas.problems(MessageType.HELLO_REPLY, linac) == []
    assert schemas.problems(MessageType.HELLO_REPLY, afterloader) == []
    unsaid = {k: v for k, v in linac.items() if k != "machine"}  # version 2 as first published
    assert schemas.problems(MessageType.HELLO_REPLY, unsaid) == []
    mixed = {**afterloader, "capabilities": linac["capabilities"]}
    assert any("channels" in p for p in schemas.problems(MessageType.HELLO_REPLY, mixed))
    no_couch = {k: v for k, v in linac.items() if k != "couch"}
    assert any("couch" in p for p in schemas.problems(MessageType.HELLO_REPLY, no_couch))


def test_the_afterloader_faults_reach_the_simulated_machine_by_their_names():
    from devices.sim.afterloader import AfterloaderFaults
    from hil.faults import Faults

    faults = Faults()
    for command in (
        {"fault": "interlock", "channel": 1, "seconds": 4.0},
        {"fault": "door", "channel": 2, "seconds": 2.0},
        {"fault": "power", "channel": 3, "seconds": 1.0},
        {"fault": "stuck", "channel": 4, "seconds": 3.0},
        {"fault": "obstructed", "channel": 5},
    ):
        assert faults.apply(command)["ok"], command
    given = {"interlocks": faults.interlocks, "afterloader_faults": faults.afterloader_faults}
    assert AfterloaderFaults.from_options(given) == AfterloaderFaults(
        door={1: 4.0, 2: 2.0}, stuck={4: 3.0}, obstructed={5}, power={3: 1.0}
    )
    faults.apply({"fault": "clear"})
    assert (
        AfterloaderFaults.from_options(
            {"interlocks": faults.interlocks, "afterloader_faults": faults.afterloader_faults}
        )
        == AfterloaderFaults()
    )


# The HELLO_REPLY of _scripted_controller: a small afterloader.
SCRIPTED_HELLO = {
    "protocol": 2,
    "machine": "afterloader",
    "identity": {"vendor": "v", "model": "m", "serial": "s", "firmware": "f"},
    "capabilities": {
        "channels": 4,
        "max_channel_length_mm": 1500.0,
        "min_dwell_s": 0.1,
        "max_dwell_s": 600.0,
        "max_dwells_per_channel": 10,
    },
    "timing": {},
    "last_channel": None,
}


def _scripted_controller(script) -> str:
    """A controller on 127.0.0.1 that answers HELLO as an afterloader, LOAD_CHANNEL with
    LOADED, and TREAT with CHANNEL_STARTED and then ``script(link)``: a controller that
    breaks hil/PROTOCOL.md in a way controller-sim never does. Returns its device URL."""
    import socket
    import threading

    from devices.link import Link, LinkLost, SocketTransport

    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        link = Link(SocketTransport(conn), validate=False)
        try:
            while not link.closed.is_set():
                frame = link.recv(timeout=0.05)
                if frame is None:
                    continue
                if frame.type == MessageType.HELLO:
                    link.send(MessageType.HELLO_REPLY, SCRIPTED_HELLO)
                elif frame.type == MessageType.LOAD_CHANNEL:
                    body = frame.body
                    total = round(sum(d["time_s"] for d in body["dwells"]), 4)
                    link.send(
                        MessageType.LOADED,
                        {
                            "channel": body["channel"],
                            "treatment": 1,
                            "dwells": len(body["dwells"]),
                            "total_s": total,
                        },
                    )
                elif frame.type == MessageType.TREAT:
                    link.send(MessageType.CHANNEL_STARTED, {"channel": 1, "treatment": 1})
                    script(link)
        except LinkLost:
            pass  # the host closed the link: the script is over
        finally:
            server.close()

    threading.Thread(target=serve, daemon=True).start()
    host, port = server.getsockname()[:2]
    return f"tcp://{host}:{port}"


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        ([(MessageType.DWELL_DONE, {"index": 1, "position_mm": 15.0, "delivered_s": 1.0})],
         "DWELL_DONE index 1 where 0 was next"),
        ([(MessageType.DWELL_PROGRESS, {"delivered_s": 1.5}),
          (MessageType.DWELL_PROGRESS, {"delivered_s": 0.5})],
         "DWELL_PROGRESS fell from 1.5 to 0.5 s"),
        ([(MessageType.CHANNEL_ENDED, {"treatment": 1, "delivered_s": 2.0, "termination": "NORMAL",
                                       "code": "", "reason": "", "dwell": None})],
         "CHANNEL_ENDED NORMAL after 0 of 2 dwells"),
    ],
)  # fmt: skip
def test_a_controller_breaking_the_treatment_rules_is_retracted_and_ends_protocol(broken, why):
    """hil/PROTOCOL.md, Treatment: the host retracts the source, ends the channel MACHINE
    with code PROTOCOL at the last valid count, and records no dwell the controller
    numbered wrongly."""
    retracted = []

    def script(link) -> None:
        for kind, body in broken:
            link.send(kind, {"channel": 1, **body})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            frame = link.recv(timeout=0.05)
            if frame is not None and frame.type == MessageType.RETRACT:
                retracted.append(frame.body["reason"])
                link.send(
                    MessageType.CHANNEL_ENDED,
                    {"channel": 1, "treatment": 1, "delivered_s": 1.5, "termination": "OPERATOR",
                     "code": "", "reason": frame.body["reason"], "dwell": 0},
                )  # fmt: skip
                return

    with open_device(_scripted_controller(script), Clock(0)) as machine:
        machine.load_channel(_channel(1, 1.0, dwells=2))
        events = list(machine.treat())
    ended = events[-1]
    assert (ended.termination, ended.code) == (Termination.MACHINE, "PROTOCOL")
    assert ended.reason == f"protocol error: {why}"
    assert retracted == [f"protocol error: {why}"]
    assert not [e for e in events if isinstance(e, DwellDone)]
    assert ended.delivered_s == 1.5
