"""Metrics scraped over HTTP from real sessions: DIMSE, UPS, beams, interlocks, the link."""

from __future__ import annotations

import pytest

from emulator.metrics import Metrics
from emulator.net.ae_factory import NetworkSettings
from emulator.net.peers import Peer
from emulator.performer.workflow import DeviceConfig, PerformingDevice
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.conftest import free_port, printed_metrics_url, scrape, start_cli_process
from tests.hil_bench import start_controller

SMALL = SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1, control_points=8)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def lab(tmp_path):
    """A reference site and one device sharing one registry, both observed."""
    made = []

    def make(kind: str = "pds", device: str = "sim", interlocks: dict | None = None):
        metrics = Metrics()
        network = NetworkSettings(observers=metrics.observers)
        port = free_port()
        site = ReferenceSite(
            SiteConfig(
                data_dir=tmp_path / "site",
                tms_port=0,
                archive_port=0,
                seed_options=SMALL,
                peers=[Peer("DEV1", "127.0.0.1", port)],
                network=network,
            ),
            metrics,
        )
        site.start()
        performer = PerformingDevice(
            DeviceConfig(
                kind,
                "LINAC1",
                "DEV1",
                Peer("TMS", *site.tms.address),
                Peer("ARCHIVE", *site.archive.address),
                tmp_path / "dev",
                listen_port=port,
                device=device,
                interlocks=interlocks or {},
                network=network,
            ),
            metrics=metrics,
        )
        performer.start()
        server = metrics.serve()
        made.append((site, performer, server))
        return site, performer, server

    yield make
    for site, performer, server in made:
        server.stop()
        performer.stop()
        site.stop()


def test_every_series_exists_before_the_first_session(lab):
    _site, _device, server = lab()
    assert server.server.server_address[0] == "127.0.0.1"
    samples = scrape(server.url)
    for status in ("success", "warning", "failure", "cancel", "aborted"):
        key = dict(ae="DEV1", actor="performer", role="scu", operation="N-ACTION", status=status)
        assert value(samples, "tdw_dimse_requests_total", **key) == 0
    for outcome in ("completed", "interrupted", "canceled", "refused", "failed"):
        assert value(samples, "tdw_sessions_total", ae="DEV1", outcome=outcome) == 0
    assert value(samples, "tdw_interlocks_total", ae="DEV1") == 0
    assert value(samples, "tdw_link_errors_total", ae="DEV1", kind="garbled") == 0
    assert value(samples, "tdw_results_backlog", ae="DEV1") == 0
    assert value(samples, "tdw_device_connected", ae="DEV1") == 1
    assert value(samples, "tdw_tms_workitems", ae="TMS", state="scheduled") == 0
    build = [k for k in samples if k[0] == "tdw_build_info"]
    assert build and dict(build[0][1])["pynetdicom"]
    assert value(samples, "process_resident_memory_bytes") > 10e6


def test_a_completed_session_is_counted_on_both_sides(lab):
    site, device, server = lab()
    site.seed("LINAC1", 1)
    outcomes = device.run_once()
    assert [o.state for o in outcomes] == ["COMPLETED"] * 4
    s = scrape(server.url)
    dev = {"ae": "DEV1", "actor": "performer", "role": "scu"}
    # RO-19 claims and RO-25 completions, and the UPS Watch subscribe and unsubscribe
    # around each claim: four N-ACTIONs per UPS, all Success.
    assert value(s, "tdw_dimse_requests_total", **dev, operation="N-ACTION", status="success") == 16
    assert value(s, "tdw_dimse_requests_total", **dev, operation="C-FIND", status="success") == 1
    tms = {"ae": "TMS", "actor": "tms", "role": "scp"}
    assert value(s, "tdw_dimse_requests_total", **tms, operation="N-ACTION", status="success") == 16
    n_sets = value(s, "tdw_dimse_requests_total", **dev, operation="N-SET", status="success")
    assert n_sets == value(
        s, "tdw_dimse_requests_total", **tms, operation="N-SET", status="success"
    )
    assert value(s, "tdw_dimse_request_duration_seconds_count", **dev, operation="N-SET") == n_sets
    assert value(s, "tdw_ups_transitions_total", ae="DEV1", state="completed") == 4
    assert value(s, "tdw_ups_transitions_total", ae="TMS", state="scheduled") == 4
    assert value(s, "tdw_tms_workitems", ae="TMS", state="completed") == 4
    assert value(s, "tdw_sessions_total", ae="DEV1", outcome="completed") == 1
    assert value(s, "tdw_beams_total", ae="DEV1", termination="normal") == SMALL.beams
    assert value(s, "tdw_meterset_delivered_total", ae="DEV1") == pytest.approx(300.0)
    assert value(s, "tdw_associations_open", ae="DEV1", role="requestor") == 0
    assert value(s, "tdw_associations_total", ae="DEV1", role="requestor", event="released") >= 4
    assert value(s, "tdw_results_backlog", ae="DEV1") == 0
    percentiles = device.metrics.metrics.latencies.percentiles()
    assert percentiles["N-ACTION"]["count"] == 16 and percentiles["all"]["p99_ms"] > 0


def test_an_interlock_is_counted_and_the_meterset_is_what_was_delivered(lab):
    site, device, server = lab(interlocks={2: 41.5})
    site.seed("LINAC1", 1)
    outcomes = device.run_once()
    assert outcomes[-1].state == "CANCELED"
    s = scrape(server.url)
    assert value(s, "tdw_interlocks_total", ae="DEV1") == 1
    assert value(s, "tdw_beams_total", ae="DEV1", termination="machine") == 1
    assert value(s, "tdw_sessions_total", ae="DEV1", outcome="interrupted") == 1
    assert value(s, "tdw_meterset_delivered_total", ae="DEV1") == pytest.approx(141.5)
    assert value(s, "tdw_ups_transitions_total", ae="TMS", state="canceled") == 1
    # The TMS scheduled the CONTINUATION: four more UPS waiting.
    assert value(s, "tdw_tms_workitems", ae="TMS", state="scheduled") == 4


def test_the_device_link_reports_frames_and_round_trips_over_a_pty(lab):
    spec, _sim, _control = start_controller("serial")
    site, device, server = lab(kind="tdd", device=spec)
    site.seed("LINAC1", 1)
    (outcome,) = device.run_once()
    assert outcome.state == "COMPLETED", outcome.reason
    s = scrape(server.url)
    sent = value(s, "tdw_link_frames_total", ae="DEV1", direction="sent")
    received = value(s, "tdw_link_frames_total", ae="DEV1", direction="received")
    assert sent > 5 and received > 5
    assert value(s, "tdw_link_round_trip_seconds_count", ae="DEV1") == sent
    assert value(s, "tdw_link_errors_total", ae="DEV1", kind="lost") == 0


def test_tms_serves_metrics_on_loopback_from_the_command_line(tmp_path):
    proc = start_cli_process(
        "tms",
        "--data-dir",
        str(tmp_path),
        "--port",
        "0",
        "--archive-port",
        "0",
        "--accept-any-ae",
        "--seed",
        "LINAC1",
        "--metrics-port",
        "0",
        ready="ready",
    )
    try:
        url = printed_metrics_url(proc.output)
        assert url.startswith("http://127.0.0.1:")
        s = scrape(url)
        assert value(s, "tdw_tms_workitems", ae="TMS", state="scheduled") == 4
        assert value(s, "tdw_ups_transitions_total", ae="TMS", state="scheduled") == 4
        key = dict(ae="ARCHIVE", actor="archive", role="scp", operation="C-STORE")
        assert value(s, "tdw_dimse_requests_total", **key, status="success") == 0
    finally:
        proc.stop()
