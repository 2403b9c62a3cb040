"""`tdw-emu run` against `tdw-emu tms` processes: a CANCELED that carries everything PS3.4
Table CC.2.5-3 asks of it, a refused final transition retried, and one that stays refused
journaled as pending, reported, and cleared by a later run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from emulator.reference.ups_store import UpsStore
from emulator.store import ObjectStore
from tests.conftest import REPO, free_port
from tests.kill_harness import cancel_reason, named_results, run_command, start_site


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _deliveries(site_dir: Path) -> list:
    ups = UpsStore(site_dir / "tms" / "ups.sqlite3")
    try:
        return [r for r in ups.select() if r.step == "delivery"]
    finally:
        ups.close()


def _traffic(report_dir: Path) -> list[dict]:
    lines = (report_dir / "dimse-traffic.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _interrupted_run(tmp_path: Path, *tms_flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`tdw-emu run --interrupt 2:50` against a `tdw-emu tms` started with ``tms_flags``."""
    port = free_port()
    site = start_site(tmp_path / "site", port, 1, *tms_flags)
    # The banner says how the TMS talks: plain DICOM here (TLS has its own tests).
    assert "  TLS off: plain DICOM on every association" in site.output
    report_dir = tmp_path / "report"
    try:
        run = run_command(
            site, port, tmp_path / "device", "--interrupt", "2:50", "--report-dir", str(report_dir)
        )
        return _run(run), report_dir
    finally:
        site.stop()


def test_interrupt_cancels_with_a_coded_reason_and_stores_the_record(tmp_path):
    result, report_dir = _interrupted_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((report_dir / "run-report.json").read_text())
    delivery = next(o for o in report["outcomes"] if o["step"] == "delivery")
    assert delivery["state"] == "CANCELED"
    assert delivery["delivered"]["2"] == pytest.approx(50.0)

    canceled = next(r for r in _deliveries(tmp_path / "site") if r.state == "CANCELED")
    item = canceled.dataset.ProcedureStepProgressInformationSequence[0]
    assert item.ProcedureStepCancellationDateTime
    assert "MACHINE termination" in cancel_reason(canceled)
    code = item.ProcedureStepDiscontinuationReasonCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "110501",
        "DCM",
        "Equipment failure",
    )
    (record_uid,) = named_results([canceled])
    archive = ObjectStore(tmp_path / "site" / "archive")
    try:
        record = archive.read(archive.get(record_uid))
    finally:
        archive.close()
    by_beam = {
        int(b.ReferencedBeamNumber): float(b.DeliveredPrimaryMeterset)
        for b in record.TreatmentSessionBeamSequence
    }
    assert by_beam[2] == pytest.approx(50.0)
    assert 0 < float(item.ProcedureStepProgress) < 100


def test_a_refused_cancel_is_sent_again_and_accepted(tmp_path):
    result, report_dir = _interrupted_run(tmp_path, "--fault-refuse-canceled", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    answers = [
        m["status"]
        for m in _traffic(report_dir)
        if m.get("message") == "N-ACTION-RSP" and m.get("action_type") == 1
    ]
    # Claims of the four UPS, three COMPLETED, then the refused CANCELED and its retry.
    assert answers.count("0xC304") == 1, answers
    assert answers[-2:] == ["0xC304", "0x0000"], answers
    assert _deliveries(tmp_path / "site")[0].state == "CANCELED"


def test_a_cancel_that_stays_refused_is_pending_then_cleared_by_a_later_run(tmp_path):
    port, tms_port, archive_port = free_port(), free_port(), free_port()
    ports = (tms_port, archive_port)
    site = start_site(tmp_path / "site", port, 1, "--fault-refuse-canceled", "always", ports=ports)
    first_report = tmp_path / "first"
    try:
        run = run_command(
            site, port, tmp_path / "device",
            "--interrupt", "2:50", "--tms-retry-window", "3", "--report-dir", str(first_report),
        )  # fmt: skip
        first = _run(run)
    finally:
        site.stop()
    assert first.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    assert "final transition pending" in first.stderr
    report = json.loads((first_report / "run-report.json").read_text())
    (pending,) = report["final_pending"]
    assert (pending["step"], pending["target"]) == ("delivery", "CANCELED")
    assert "0xC304" in pending["reason"] and "refused by fault injection" in pending["reason"]
    delivery = _deliveries(tmp_path / "site")[0]
    assert (delivery.sop_instance_uid, delivery.state) == (pending["ups"], "IN PROGRESS")

    # The TMS accepts cancels again; the same device, on the same data dir, ends the UPS.
    site = start_site(tmp_path / "site", port, 0, ports=ports)
    second_report = tmp_path / "second"
    try:
        second = _run(
            run_command(site, port, tmp_path / "device", "--report-dir", str(second_report))
        )
    finally:
        site.stop()
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads((second_report / "run-report.json").read_text())
    assert report["final_pending"] == []
    settled = next(o for o in report["outcomes"] if o["sop_instance_uid"] == pending["ups"])
    assert (settled["state"], settled["settled"]) == ("CANCELED", True)
    states = {r.sop_instance_uid: r.state for r in _deliveries(tmp_path / "site")}
    assert states[pending["ups"]] == "CANCELED"
    assert "IN PROGRESS" not in states.values()
