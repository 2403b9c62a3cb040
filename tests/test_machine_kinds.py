"""The three machine kinds described by YAML: C-arm linac, afterloader, positioning couch."""

from __future__ import annotations

import datetime as dt

import pytest

from devices.base import (
    BeamEnded,
    DeviceError,
    DwellPosition,
    DwellProgramme,
    DwellReached,
    MetersetTick,
)
from devices.clock import Clock
from devices.couch_axes import TableTop, to_table_top
from devices.registry import open_device
from devices.sim.afterloader import SimulatedAfterloader
from devices.sim.linac import load_machine_profile

PROGRAMME = DwellProgramme(
    1,
    "cervix",
    (DwellPosition(1, 0.0, 10.0), DwellPosition(1, 5.0, 12.0), DwellPosition(2, 0.0, 8.0)),
)


def afterloader(days_after_reference: int) -> SimulatedAfterloader:
    profile = load_machine_profile("afterloader")
    reference = dt.date.fromisoformat(profile["source"]["reference_date"])
    device = SimulatedAfterloader(
        profile, Clock(0), today=reference + dt.timedelta(days=days_after_reference)
    )
    device.connect()
    return device


def test_sim_backend_picks_the_model_from_the_profile_kind():
    with open_device("sim:afterloader", Clock(0)) as device:
        assert device.identify().model == "SimAfterloader HDR"
    with open_device("sim:couch", Clock(0)) as device:
        assert device.identify().model == "SimCouch 6DOF"
    with open_device("sim", Clock(0)) as device:
        assert device.identify().model == "SimLinac C-arm"


def test_dwell_times_are_corrected_for_source_decay():
    half_life = round(load_machine_profile("afterloader")["source"]["half_life_days"])
    fresh, decayed = afterloader(0), afterloader(half_life)
    for device in (fresh, decayed):
        device.load_dwell_programme(PROGRAMME)
    fresh_events, decayed_events = list(fresh.treat()), list(decayed.treat())
    fresh_dwells = [e.actual_time_s for e in fresh_events if isinstance(e, DwellReached)]
    decayed_dwells = [e.actual_time_s for e in decayed_events if isinstance(e, DwellReached)]
    assert fresh_dwells == [10.0, 12.0, 8.0]
    assert decayed_dwells == pytest.approx([2 * t for t in fresh_dwells], rel=0.01)
    for events in (fresh_events, decayed_events):
        # The meterset stays in reference seconds: the plan's 30 s, whatever the date.
        assert isinstance(events[-1], BeamEnded) and events[-1].meterset == 30.0


def test_afterloader_limits_and_an_interrupted_treatment():
    device = afterloader(0)
    with pytest.raises(DeviceError, match="channel 19 does not exist"):
        device.load_dwell_programme(DwellProgramme(2, "bad", (DwellPosition(19, 0, 5.0),)))
    with pytest.raises(DeviceError, match="outside the machine's limits"):
        device.load_dwell_programme(DwellProgramme(3, "long", (DwellPosition(1, 0, 900.0),)))
    device.load_dwell_programme(PROGRAMME)
    events = []
    for event in device.treat():
        events.append(event)
        if isinstance(event, MetersetTick) and event.meterset >= 10:
            device.interrupt("door opened")
    assert events[-1].termination.value == "OPERATOR" and events[-1].meterset == 10.0
    with pytest.raises(DeviceError, match="not external beams"):
        device.beam_on()


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
        with pytest.raises(DeviceError, match="no beams"):
            couch.beam_on()
        assert couch.acquire("CBCT").pixels
    with open_device("sim", Clock(0)) as linac, pytest.raises(DeviceError, match="no source"):
        linac.load_dwell_programme(PROGRAMME)
