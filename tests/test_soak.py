"""Soak runs: the verdict counts what happened, and a loss is caught, not hidden."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from emulator.metrics import Metrics
from emulator.soak.fleet import FleetError, parse_mix, plan_fleet
from emulator.soak.runner import SoakConfig, SoakRun
from emulator.soak.verdict import DeliveryRecord, SoakLimits, audit_records, judge_limits
from tests.conftest import start_cli_process


def test_mix_lays_out_whole_units_and_exactly_the_count():
    fleet = plan_fleet(5, parse_mix("pds=1,pps+tdd=1"))
    assert [m.kind for m in fleet] == ["pds", "pds", "pds", "pps", "tdd"]
    assert fleet[3].station == fleet[4].station != fleet[2].station
    assert len({m.ae_title for m in fleet}) == 5
    assert [m.kind for m in plan_fleet(3, parse_mix("pps+tdd=1"))] == ["pds", "pps", "tdd"]
    with pytest.raises(FleetError, match="unknown unit"):
        parse_mix("tdd=1")
    with pytest.raises(FleetError):
        parse_mix("pds=x")


def _record(beams: dict[int, float]) -> Dataset:
    ds = Dataset()
    items = []
    for number, mu in beams.items():
        item = Dataset()
        item.ReferencedBeamNumber = number
        item.DeliveredPrimaryMeterset = mu
        items.append(item)
    ds.TreatmentSessionBeamSequence = items
    return ds


def test_audit_names_lost_records_missing_beams_and_meterset_mismatches():
    deliveries = [
        DeliveryRecord("PDS001", "1.1", "COMPLETED", "TREATMENT", {1: 100.0, 2: 100.0}, ["r1"]),
        DeliveryRecord("PDS002", "1.2", "CANCELED", "TREATMENT", {1: 100.0, 2: 40.0}, ["r2"]),
        DeliveryRecord("PDS003", "1.3", "COMPLETED", "TREATMENT", {1: 100.0}, ["r3"]),
    ]
    archive = {"r1": _record({1: 100.0, 2: 100.0}), "r2": _record({1: 100.0, 2: 41.0})}
    audit = audit_records(deliveries, archive.get)
    assert audit["delivered_beams"] == 5
    assert (audit["lost_records"], audit["lost_beams"], audit["mismatched_beams"]) == (1, 1, 1)
    assert any("r3 is not in the Archive" in p for p in audit["problems"])
    assert any("recorded 41 MU, the device measured 40" in p for p in audit["problems"])


def test_embedded_soak_with_interlocks_loses_nothing(tmp_path):
    config = SoakConfig(
        devices=3,
        duration_s=20,
        mix=parse_mix("pds=1,pps+tdd=1"),
        fault_rate=0.4,
        time_scale=0.02,
        drain_s=60,
        seed=3,
        data_dir=tmp_path,
    )
    verdict = SoakRun(config, Metrics()).run()
    assert verdict.ok, verdict.problems
    assert verdict.sessions["completed"] >= 3
    assert verdict.sessions.get("interrupted", 0) >= 1
    assert verdict.continuations_completed >= 1
    records = verdict.records
    assert records["delivered_beams"] > 0
    assert records["lost_records"] == records["lost_beams"] == records["mismatched_beams"] == 0
    assert records["records_in_archive"] == records["records_stored"]
    assert verdict.tms.get("in_progress", 0) == 0
    # A completed session claimed and ended at least one UPS: two N-ACTIONs at least.
    assert verdict.latency_ms["N-ACTION"]["count"] >= 2 * verdict.sessions["completed"]
    memory = verdict.memory
    assert memory["rss_start_mib"] <= memory["rss_peak_mib"]
    assert memory["rss_end_mib"] <= memory["rss_peak_mib"]
    assert memory["growth_mib"] == pytest.approx(
        memory["rss_end_mib"] - memory["rss_after_warmup_mib"], abs=0.2
    )


class ForgetfulArchiveSoak(SoakRun):
    """The Archive acknowledges RT Beams Treatment Records and then loses them."""

    def _start_site(self, root):
        super()._start_site(root)
        store = self.site.archive.store
        keep = store.put

        def put(encoded, header, calling_ae=""):
            outcome = keep(encoded, header, calling_ae)
            if str(header.get("Modality", "")) == "RTRECORD":
                store.withdraw(str(header.SOPInstanceUID))
            return outcome

        store.put = put


def test_a_lost_record_fails_the_verdict(tmp_path):
    config = SoakConfig(devices=1, duration_s=4, drain_s=60, data_dir=tmp_path)
    verdict = ForgetfulArchiveSoak(config, Metrics()).run()
    assert not verdict.ok
    assert verdict.records["lost_records"] >= 1
    assert verdict.records["lost_records"] == verdict.records["records_stored"]
    assert any("records" in p and "lost" in p for p in verdict.problems)


def _soak_cli(tmp_path, *limits: str, ready: str) -> tuple[int, dict, list[str]]:
    out = tmp_path / "verdict.json"
    proc = start_cli_process(
        "soak", "--embedded", "--devices", "2", "--duration", "6s", "--json", str(out),
        *limits, ready=ready, timeout=180,
    )  # fmt: skip
    proc.process.wait(timeout=60)
    return proc.process.returncode, json.loads(out.read_text()), proc.output


def test_soak_command_writes_the_verdict_and_judges_its_limits(tmp_path):
    # Limits a loopback soak at time scale 0.02 keeps with room to spare: a DIMSE exchange
    # on 127.0.0.1 takes milliseconds, 2 devices allocate a few MiB.
    code, verdict, output = _soak_cli(
        tmp_path, "--max-p95-ms", "2000", "--max-p99-ms", "5000", "--max-rss-growth-mib", "512",
        ready="PASS",
    )  # fmt: skip
    assert code == 0, "\n".join(output)
    assert verdict["ok"] and verdict["devices"] == 2
    assert verdict["records"]["lost_records"] == 0
    assert verdict["sessions"]["completed"] >= 2
    assert verdict["limits"] == {"p95_ms": 2000, "p99_ms": 5000, "rss_growth_mib": 512}
    every = verdict["latency_ms"]["all"]
    assert 0 < every["p50_ms"] <= every["p95_ms"] <= every["p99_ms"] <= 5000
    # A 6 s run says how much memory grew, but draws no hourly rate from it.
    assert verdict["memory"]["growth_mib_per_hour"] is None
    assert verdict["memory"]["window_s"] < 600
    assert any("soak verdict" in line for line in output)


def test_a_soak_over_its_limits_fails_and_names_each(tmp_path):
    code, verdict, output = _soak_cli(
        tmp_path, "--max-p99-ms", "0.001", "--max-rss-growth-mib-per-hour", "10", ready="FAIL"
    )
    assert code == 1, "\n".join(output)
    assert not verdict["ok"]
    over = [p for p in verdict["problems"] if "p99 latency" in p and "over the limit 0.001 ms" in p]
    assert {p.split()[0] for p in over} >= {"all", "C-FIND", "N-ACTION"}, verdict["problems"]
    assert any("memory growth per hour not judged" in p for p in verdict["problems"])
    # Nothing else went wrong: the run itself lost nothing.
    assert verdict["records"]["lost_records"] == 0 and verdict["sessions"]["completed"] >= 2


def test_limits_are_judged_against_the_measured_figures():
    latency = {"N-SET": {"count": 10, "p95_ms": 12.0, "p99_ms": 30.0}}
    memory = {"growth_mib": 40.0, "growth_mib_per_hour": 80.0, "window_s": 1800.0}
    assert judge_limits(SoakLimits(p95_ms=12.0, p99_ms=30.0), latency, memory) == []
    assert judge_limits(SoakLimits(p95_ms=11.9), latency, memory) == [
        "N-SET p95 latency 12.0 ms is over the limit 11.9 ms"
    ]
    assert judge_limits(
        SoakLimits(rss_growth_mib=39.0, rss_growth_mib_per_hour=79.0), latency, memory
    ) == [
        "resident memory grew 40.0 MiB after the warm-up, over the limit 39 MiB",
        "resident memory grew 80.0 MiB/h, over the limit 79 MiB/h",
    ]


def test_soak_against_an_external_tms_confirms_records_at_its_archive(tmp_path):
    """The reference site stands in for a vendor TMS: it knows where the devices receive
    (one peer pattern for the fleet's one receiver) and has scheduled sessions for their
    stations; the soak only performs and audits."""
    from emulator.net.peers import Peer
    from emulator.reference.site import ReferenceSite, SiteConfig
    from emulator.seeding import SeedOptions
    from tests.conftest import free_port

    port = free_port()
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            seed_options=SeedOptions(slices=6, rows=48, beams=3, dynamic_beams=1),
            peers=[Peer("PDS*", "127.0.0.1", port)],
        )
    )
    with site:
        site.seed("SOAK001", 1)
        config = SoakConfig(
            devices=1,
            duration_s=5,
            drain_s=30,
            tms=Peer("TMS", *site.tms.address),
            archive=Peer("ARCHIVE", *site.archive.address),
            listen_port=port,
            data_dir=tmp_path / "soak",
        )
        verdict = SoakRun(config, Metrics()).run()
    assert verdict.ok, verdict.problems
    assert verdict.sessions["completed"] == 1
    assert verdict.records["records_in_archive"] == verdict.records["records_stored"] == 1
    assert verdict.tms == {}  # an external TMS is judged by what the devices saw


def test_a_tms_that_refuses_for_lack_of_slots_costs_no_session(tmp_path):
    """Six devices against a TMS and Archive that take two associations at a time: many are
    rejected ("local limit exceeded", transient) and retried with backoff; every session
    still completes and nothing is lost."""
    metrics = Metrics()
    config = SoakConfig(
        devices=6, duration_s=15, time_scale=0.02, max_associations=2, data_dir=tmp_path
    )
    verdict = SoakRun(config, metrics).run()
    rejected = sum(
        metrics.registry.get_sample_value(
            "tdw_associations_total", {"ae": ae, "role": "acceptor", "event": "rejected"}
        )
        or 0
        for ae in ("TMS", "ARCHIVE")
    )
    assert rejected > 0  # the limit was hit, for real
    assert verdict.ok, verdict.problems
    assert verdict.sessions["completed"] >= 6
    assert verdict.sessions.get("canceled", 0) == verdict.sessions.get("failed", 0) == 0
    assert verdict.tms.get("in_progress", 0) == 0
