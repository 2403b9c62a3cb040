"""The three machine kinds described by YAML: C-arm linac, afterloader, positioning couch."""

from __future__ import annotations

import datetime as dt

import pytest

from devices.afterloader import ChannelEnded, ChannelProgramme, ChannelTick, Dwell, DwellDone
from devices.base import BeamDeliverer, DeviceError, role
from devices.clock import Clock
from devices.couch_axes import TableTop, to_table_top
from devices.registry import open_device
from devices.sim.afterloader import AfterloaderFaults, SimulatedAfterloader
from devices.sim.linac import load_machine_profile

PROGRAMME = ChannelProgramme(
    1, 1200.0, (Dwell(0, 5.0, 10.0), Dwell(1, 10.0, 12.0), Dwell(2, 15.0, 8.0))
)


def afterloader(faults: AfterloaderFaults | None = None, days_after_exchange: float = 0):
    profile = load_machine_profile("afterloader")
    exchange = dt.datetime.fromisoformat(profile["source"]["first_exchange"])
    when = exchange + dt.timedelta(days=days_after_exchange)
    device = SimulatedAfterloader(profile, Clock(0), faults, now=lambda: when)
    device.connect()
    return device


def test_sim_backend_picks_the_model_from_the_profile_kind():
    with open_device("sim:afterloader", Clock(0)) as device:
        assert device.identify().model == "SimAfterloader HDR"
    with open_device("sim:couch", Clock(0)) as device:
        assert device.identify().model == "SimCouch 6DOF"
    with open_device("sim", Clock(0)) as device:
        assert device.identify().model == "SimLinac C-arm"


def test_the_loaded_source_decays_and_is_exchanged():
    half_life = load_machine_profile("afterloader")["source"]["half_life_days"]
    fresh, decayed = afterloader(), afterloader(days_after_exchange=half_life)
    assert fresh.source().reference == decayed.source().reference  # the same source
    now = decayed.now()
    assert decayed.source().strength_at(now) == pytest.approx(
        fresh.source().reference_air_kerma_rate / 2, rel=1e-6
    )
    later = afterloader(days_after_exchange=95)  # past the 91-day exchange: a new source
    assert later.source().reference > fresh.source().reference


def test_a_channel_reports_each_dwell_as_measured():
    device = afterloader()
    device.load_channel(PROGRAMME)
    events = list(device.treat())
    done = [e for e in events if isinstance(e, DwellDone)]
    assert [(d.index, d.delivered_s) for d in done] == [(0, 10.0), (1, 12.0), (2, 8.0)]
    assert isinstance(events[-1], ChannelEnded) and events[-1].delivered_s == 30.0
    assert events[-1].termination.value == "NORMAL"
    ticks = [e.delivered_s for e in events if isinstance(e, ChannelTick)]
    assert ticks == sorted(ticks) and ticks[-1] == 30.0


def test_afterloader_limits_and_an_operator_hold():
    device = afterloader()
    with pytest.raises(DeviceError, match="channel 19 does not exist"):
        device.load_channel(ChannelProgramme(19, 1200.0, (Dwell(0, 5.0, 5.0),)))
    with pytest.raises(DeviceError, match="outside the machine's"):
        device.load_channel(ChannelProgramme(3, 1200.0, (Dwell(0, 5.0, 900.0),)))
    device.load_channel(PROGRAMME)
    events = []
    for event in device.treat():
        events.append(event)
        if isinstance(event, ChannelTick) and event.delivered_s >= 14:
            device.interrupt("operator pressed stop")
    ended = events[-1]
    assert ended.termination.value == "OPERATOR" and ended.delivered_s == pytest.approx(14.0)
    assert ended.dwell == 1  # stopped in the second dwell
    with pytest.raises(DeviceError, match="cannot deliver external beams"):
        role(device, BeamDeliverer)


@pytest.mark.parametrize(
    ("faults", "code", "delivered"),
    [
        (AfterloaderFaults(door={1: 11.0}), "DOOR", 11.0),
        (AfterloaderFaults(power={1: 3.5}), "POWER", 3.5),
        (AfterloaderFaults(stuck={1: 2.0}), "RETRACT", 32.0),
        (AfterloaderFaults(obstructed={1}), "OBSTRUCTION", 0.0),
    ],
)
def test_each_fault_ends_the_channel_with_what_was_measured(faults, code, delivered):
    device = afterloader(faults)
    device.load_channel(PROGRAMME)
    events = list(device.treat())
    ended = events[-1]
    assert (ended.termination.value, ended.code) == ("MACHINE", code)
    assert ended.delivered_s == pytest.approx(delivered)
    given = sum(e.delivered_s for e in events if isinstance(e, DwellDone))
    assert given <= ended.delivered_s + 1e-9  # the dwells done never exceed the total
    # The fault happened once: the channel treats normally again.
    device.load_channel(PROGRAMME)
    assert list(device.treat())[-1].termination.value == "NORMAL"


def test_couch_moves_within_its_limits_and_has_no_beam():
    with open_device("sim:couch", Clock(0)) as couch:
        # A patient correction (LPS, head first supine) as the table top moves (IEC 61217).
        position = couch.move_couch(to_table_top((3.0, -2.0, 1.5), (0.5, 0.0, -1.0), "HFS"))
        assert (position.lateral_mm, position.longitudinal_mm, position.vertical_mm) == (
            3.0,
            1.5,
            2.0,
        )
        assert couch.couch_position() == position
        with pytest.raises(DeviceError, match="rotation beyond"):
            couch.move_couch(TableTop(pitch_deg=5.0))
        with pytest.raises(DeviceError, match="cannot deliver external beams"):
            role(couch, BeamDeliverer)
        assert couch.acquire("CBCT").pixels
    from devices.afterloader import Afterloader

    with open_device("sim", Clock(0)) as linac, pytest.raises(DeviceError, match="cannot drive"):
        role(linac, Afterloader)
