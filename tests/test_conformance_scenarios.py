"""The scenario suite: the reference TMS passes it; broken TMS variants are caught by name.

The reference run goes through two real processes (``tdw-emu tms --seed-scenarios`` and
``tdw-emu scenarios run``). Each mutant is a real reference site, started in-process with
one behaviour broken, judged by the same CLI entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from emulator.cli import main
from emulator.conformance.suite import load_scenarios
from emulator.net.peers import Peer
from emulator.net.stored_file_sender import StoredFileReference
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.conftest import free_port, start_cli_process

SMALL = SeedOptions(slices=8, rows=32, beams=3, dynamic_beams=1, control_points=6)


def _devices() -> list[Peer]:
    return [
        Peer("TDWEMU1", "127.0.0.1", free_port()),
        Peer("TDWEMU2", "127.0.0.1", free_port()),
    ]


def _run_cli(tms: Peer, archive: Peer, devices: list[Peer], report: Path, *extra: str) -> int:
    args = ["scenarios", "run", "--tms", str(tms), "--archive", str(archive)]
    for device in devices:
        args += ["--device", str(device)]
    return main([*args, "--report-dir", str(report), *extra])


def test_reference_tms_passes_every_scenario_and_all_reports_are_written(tmp_path):
    devices = _devices()
    site = start_cli_process(
        "tms",
        "--data-dir",
        str(tmp_path / "site"),
        "--port",
        "0",
        "--archive-port",
        "0",
        *(a for d in devices for a in ("--peer", str(d))),
        "--seed-scenarios",
        ready="ready",
        timeout=300,
    )
    tms_port, archive_port = site.addresses["TMS"][1], site.addresses["ARCHIVE"][1]
    try:
        report = tmp_path / "report"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "emulator.cli",
                "scenarios",
                "run",
                "--tms",
                f"TMS@127.0.0.1:{tms_port}",
                "--archive",
                f"ARCHIVE@127.0.0.1:{archive_port}",
                *(a for d in devices for a in ("--device", str(d))),
                "--report-dir",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        site.stop()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    count = len(load_scenarios(edition="ihe-ro-2008"))
    assert f"PASS: {count} of {count} scenarios passed" in run.stdout

    data = json.loads((report / "conformance.json").read_text())
    assert data["ok"] is True
    assert [s["name"] for s in data["scenarios"]] == [
        s.name for s in load_scenarios(edition="ihe-ro-2008")
    ]
    assert all(s["ok"] for s in data["scenarios"])
    missing = next(s for s in data["scenarios"] if s["name"] == "inputs-missing")
    assert {f["rule"] for f in missing["findings"]} == {"RO-17/Note-8-retrievable"}
    assert all(f["expected"] for f in missing["findings"])
    race = next(s for s in data["scenarios"] if s["name"] == "race-for-ups")
    assert "1 winner(s)" in race["steps"][1]["observed"]

    junit = ET.parse(report / "conformance-junit.xml").getroot()
    cases = junit.findall(".//testcase")
    steps = sum(len(s.steps) for s in load_scenarios(edition="ihe-ro-2008"))
    rules = [c for c in cases if c.get("classname", "").endswith(".rules")]
    assert len(cases) - len(rules) == steps
    assert {c.get("name") for c in rules} >= {"RO-17/Response-count", "CC/State-table"}
    assert junit.get("failures") == "0" and not junit.findall(".//failure")
    assert junit.get("errors") == "0" and float(junit.get("time")) > 0

    html = (report / "conformance.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "PASS" in html
    assert html.count('class="lane"') > 20  # one timeline lane per association
    assert "<script src" not in html and "<link" not in html  # self-contained

    lines = [json.loads(line) for line in (report / "dimse-traffic.jsonl").read_text().splitlines()]
    names = {line.get("message") for line in lines}
    assert {"C-FIND-RQ", "N-ACTION-RSP", "N-SET-RSP", "C-MOVE-RSP", "C-STORE-RQ"} <= names
    assert any(line.get("event") == "A-ABORT" for line in lines)  # the abort scenario
    claims = [
        line
        for line in lines
        if line.get("message") == "N-ACTION-RSP" and line["label"].startswith("race-for-ups")
    ]
    assert claims and all(line["status"] in ("0x0000", "0xC302") for line in claims)


# -- mutants ---------------------------------------------------------------------------------


class _EventWith:
    """An event with the parts the mutant rewrote (``modification_list``, ``identifier``);
    everything else passes through."""

    def __init__(self, event, **rewritten: Dataset) -> None:
        self._event = event
        self.__dict__.update(rewritten)

    def __getattr__(self, name: str):
        return getattr(self._event, name)


def _three_ups(site: ReferenceSite) -> None:
    original = site.tms._on_find

    def on_find(event):
        for status, ds in original(event):
            items = (ds.get("ScheduledWorkitemCodeSequence") or []) if ds is not None else []
            if items and items[0].CodeValue == "121722":
                continue  # the adjustment UPS is never returned
            yield status, ds

    site.tms._on_find = on_find


def _no_transaction_check(site: ReferenceSite) -> None:
    tms = site.tms
    change_state, on_n_set = tms._change_state, tms._on_n_set

    def recorded(uid: str) -> str:
        record = tms.ups.get(uid)
        return record.transaction_uid if record is not None else ""

    def lenient_change_state(uid: str, info: Dataset):
        if recorded(uid) and info.get("ProcedureStepState") != "IN PROGRESS":
            info.TransactionUID = recorded(uid)
        return change_state(uid, info)

    def lenient_n_set(event):
        uid = str(event.request.RequestedSOPInstanceUID)
        modifications = event.modification_list or Dataset()
        if recorded(uid):
            modifications.TransactionUID = recorded(uid)
        return on_n_set(_EventWith(event, modification_list=modifications))

    tms._change_state, tms._on_n_set = lenient_change_state, lenient_n_set


def _no_continuation(site: ReferenceSite) -> None:
    site.tms._after_canceled = lambda canceled, performed: None


def _move_status_0001(site: ReferenceSite) -> None:
    original = site.tms.qr.on_move

    def on_move(event):
        for item in original(event):
            # announce one sub-operation more, so a status can follow the last C-STORE
            yield item + 1 if isinstance(item, int) else item
        yield 0x0001, None  # "done, with a warning": not a C-MOVE status (PS3.4 C.4-2)

    site.tms.qr.on_move = on_move


def _drops_cancel_requested(site: ReferenceSite) -> None:
    watch = site.tms.watch
    owe = watch._owe

    def owe_all_but_cancel_requested(db, ae_title, uid, event_type, info):
        if event_type != 2:  # UPS Cancel Requested never leaves this TMS
            owe(db, ae_title, uid, event_type, info)

    watch._owe = owe_all_but_cancel_requested


def _plan_in_other_frame(site: ReferenceSite) -> None:
    original = site.archive.qr.on_move

    def on_move(event):
        for item in original(event):
            if isinstance(item, tuple) and isinstance(item[-1], StoredFileReference):
                ds = dcmread(item[1].stored_path)
                if ds.get("Modality") == "RTPLAN":
                    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1999"
                    item = (item[0], ds)  # sent as a Dataset, as any other handler's
            yield item

    site.archive.qr.on_move = on_move


def _ignores_state_key(site: ReferenceSite) -> None:
    original = site.tms._on_find

    def on_find(event):
        if event.context.abstract_syntax != site.tms.profile.sop_classes["ups_pull"]:
            yield from original(event)
            return
        identifier = event.identifier
        identifier.ProcedureStepState = ""  # every state matches, SCHEDULED or not
        yield from original(_EventWith(event, identifier=identifier))

    site.tms._on_find = on_find


def _state_of(site: ReferenceSite, uid: str) -> str:
    record = site.tms.ups.get(uid)
    return record.state if record is not None else ""


def _success_reply(state: str) -> tuple[Dataset, Dataset]:
    status, reply = Dataset(), Dataset()
    status.Status = 0x0000
    reply.ProcedureStepState = state
    return status, reply


def _cancel_leaves_in_progress(site: ReferenceSite) -> None:
    original = site.tms._change_state

    def change_state(uid: str, info: Dataset):
        if info.get("ProcedureStepState") == "CANCELED" and _state_of(site, uid) == "IN PROGRESS":
            return _success_reply("CANCELED")  # says CANCELED, keeps it IN PROGRESS
        return original(uid, info)

    site.tms._change_state = change_state


def _no_dynamic_inputs(site: ReferenceSite) -> None:
    def on_move(event):
        yield 0  # no sub-operations: the RT Beams Delivery Instruction never leaves
        yield 0x0000, None

    site.tms.qr.on_move = on_move


def _grants_second_claim(site: ReferenceSite) -> None:
    original = site.tms._change_state

    def change_state(uid: str, info: Dataset):
        if (
            info.get("ProcedureStepState") == "IN PROGRESS"
            and _state_of(site, uid) == "IN PROGRESS"
        ):
            return _success_reply("IN PROGRESS")
        return original(uid, info)

    site.tms._change_state = change_state


def _completes_without_final_state(site: ReferenceSite) -> None:
    original = site.tms._change_state

    def change_state(uid: str, info: Dataset):
        status, reply = original(uid, info)
        if status.Status != 0xC304 or info.get("ProcedureStepState") != "COMPLETED":
            return status, reply

        def complete(current):
            current.dataset.ProcedureStepState = "COMPLETED"
            return replace(current, state="COMPLETED")

        site.tms.ups.transition(uid, complete)
        return _success_reply("COMPLETED")

    site.tms._change_state = change_state


def _n_set_while_scheduled(site: ReferenceSite) -> None:
    original = site.tms._on_n_set

    def on_n_set(event):
        if _state_of(site, str(event.request.RequestedSOPInstanceUID)) == "SCHEDULED":
            status = Dataset()
            status.Status = 0x0000
            return status, None
        return original(event)

    site.tms._on_n_set = on_n_set


def _transaction_bound_to_association(site: ReferenceSite) -> None:
    """Accepts an N-SET only on the association that claimed: a retry after an abort fails."""
    on_n_action, on_n_set = site.tms._on_n_action, site.tms._on_n_set
    claimed_on: dict[str, int] = {}

    def n_action(event):
        status, reply = on_n_action(event)
        if reply is not None and reply.get("ProcedureStepState") == "IN PROGRESS":
            claimed_on[str(event.request.RequestedSOPInstanceUID)] = id(event.assoc)
        return status, reply

    def n_set(event):
        uid = str(event.request.RequestedSOPInstanceUID)
        if claimed_on.get(uid, id(event.assoc)) != id(event.assoc):
            status = Dataset()
            status.Status = 0xC301
            return status, None
        return on_n_set(event)

    site.tms._on_n_action, site.tms._on_n_set = n_action, n_set


def _slow_worklist(site: ReferenceSite) -> None:
    original = site.tms._on_find

    def on_find(event):
        time.sleep(2.5)  # longer than RO-17/Responsive allows a query to take
        yield from original(event)

    site.tms._on_find = on_find


def _loser_gets_c300(site: ReferenceSite) -> None:
    original = site.tms._change_state

    def change_state(uid: str, info: Dataset):
        status, reply = original(uid, info)
        if status.Status == 0xC302:
            status.Status = 0xC300  # "invalid state" instead of "already IN PROGRESS"
        return status, reply

    site.tms._change_state = change_state


def _drops_plan_from_inputs(site: ReferenceSite) -> None:
    original = site.tms._on_find
    plan_class = site.tms.profile.sop_classes["rt_plan"]

    def on_find(event):
        for status, ds in original(event):
            if ds is not None and "InputInformationSequence" in ds:
                ds.InputInformationSequence = [
                    item
                    for item in ds.InputInformationSequence
                    if item.ReferencedSOPSequence[0].ReferencedSOPClassUID != plan_class
                ]
            yield status, ds

    site.tms._on_find = on_find


def _continues_without_brachy_records(site: ReferenceSite) -> None:
    """A TMS that schedules an HDR continuation without the fraction's brachy records in
    its inputs: the afterloader cannot tell what was given and treats the whole plan."""
    original = site.tms.scheduler.schedule_session

    def schedule_session(*args, **kwargs):
        kwargs.pop("extra_tms_inputs", None)
        return original(*args, **kwargs)

    site.tms.scheduler.schedule_session = schedule_session


def _n_set_answers(status_code: int):
    """A TMS that stores each N-SET of an IN PROGRESS UPS and answers it with
    ``status_code``, a status PS3.4 does not define for N-SET."""

    def breaks(site: ReferenceSite) -> None:
        original = site.tms._on_n_set

        def on_n_set(event):
            status, reply = original(event)
            if status.Status == 0x0000:
                status.Status = status_code
            return status, reply

        site.tms._on_n_set = on_n_set

    return breaks


MUTANTS = {
    # A TMS's answer is the TMS's finding, never the suite's error: an N-SET it took and
    # answered oddly is CC/Status-code (and CC/State-table, which wants 0000).
    "n-set-answers-ff00": (
        _n_set_answers(0xFF00),
        "operator-cancel-before-beam-on",
        "CC/Status-code",
    ),
    "n-set-answers-3c10": (
        _n_set_answers(0x3C10),
        "operator-cancel-before-beam-on",
        "CC/Status-code",
    ),
    "returns-three-ups": (_three_ups, "normal-fraction", "RO-17/Response-count"),
    "skips-transaction-uid-check": (
        _no_transaction_check,
        "wrong-transaction-uid",
        "CC/State-table",
    ),
    "never-schedules-continuation": (
        _no_continuation,
        "interruption-continuation",
        "RO-17/Note-5-continuation",
    ),
    "c-move-wrong-status": (_move_status_0001, "normal-fraction", "RO-20/Move-status"),
    "drops-cancel-requested": (
        _drops_cancel_requested,
        "events-cancel-requested",
        "CC/Event-cancel-requested",
    ),
    "plan-in-other-frame": (
        _plan_in_other_frame,
        "normal-fraction",
        "Appendix-A/A.1-Frame-of-Reference",
    ),
    "ignores-the-state-key": (_ignores_state_key, "pps-tdd-split", "RO-17/Note-1"),
    "cancel-leaves-in-progress": (
        _cancel_leaves_in_progress,
        "operator-cancel-before-beam-on",
        "RO-25/Canceled-reply",
    ),
    # Under TDW-II a rule is cited by its TDW-II transaction number (RO-20 is RO-61 there).
    "no-dynamic-inputs": (_no_dynamic_inputs, "dynamic-inputs-after-claim", "RO-61/Move-status"),
    "grants-a-second-claim": (_grants_second_claim, "claim-in-progress", "CC/State-table"),
    "completes-without-final-state": (
        _completes_without_final_state,
        "completed-without-final-state",
        "CC/State-table",
    ),
    "n-set-while-scheduled": (_n_set_while_scheduled, "n-set-while-scheduled", "CC/State-table"),
    "transaction-bound-to-association": (
        _transaction_bound_to_association,
        "abort-during-n-set",
        "CC/Retry-after-abort",
    ),
    "slow-worklist": (_slow_worklist, "long-beam-while-querying", "RO-17/Responsive"),
    "race-loser-gets-c300": (_loser_gets_c300, "race-for-ups", "CC/State-table"),
    "drops-plan-from-inputs": (_drops_plan_from_inputs, "inputs-missing", "RO-17/Note-8"),
    "drops-the-hdr-plan": (_drops_plan_from_inputs, "afterloader-fraction", "RO-17/Note-8"),
    "continues-hdr-without-records": (
        _continues_without_brachy_records,
        "afterloader-door-continuation",
        "RO-17/Note-5-continuation",
    ),
}

# Scenarios that exist only in some editions: their mutant runs under that edition.
EDITION_OF = {"dynamic-inputs-after-claim": "tdw-ii"}


def test_every_scenario_of_every_edition_has_a_mutant_that_fails_it():
    scenarios = {
        s.name for edition in ("ihe-ro-2008", "tdw-ii") for s in load_scenarios(edition=edition)
    }
    assert scenarios == {scenario for _, scenario, _ in MUTANTS.values()}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_each_mutant_tms_fails_and_the_broken_rule_is_named(mutant, tmp_path, capsys):
    breaks, scenario_name, rule = MUTANTS[mutant]
    edition = EDITION_OF.get(scenario_name, "ihe-ro-2008")
    devices = _devices()
    config = SiteConfig(
        data_dir=tmp_path / "site",
        tms_port=0,
        archive_port=0,
        peers=devices,
        seed_options=SMALL,
        edition=edition,
    )
    site = ReferenceSite(config)
    scenario = next(s for s in load_scenarios(edition=edition) if s.name == scenario_name)
    site.seed(scenario.station, 1, kind=scenario.kind)
    breaks(site)
    addresses = site.start()
    try:
        tms = Peer("TMS", "127.0.0.1", addresses["TMS"][1])
        archive = Peer("ARCHIVE", "127.0.0.1", addresses["ARCHIVE"][1])
        report = tmp_path / "report"
        code = _run_cli(
            tms, archive, devices, report, "--only", scenario_name, "--profile", edition
        )
    finally:
        site.stop()
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL: 0 of 1 scenarios passed" in out
    assert rule in out, out
    junit = ET.parse(report / "conformance-junit.xml").getroot()
    failures = " ".join(
        (f.get("message") or "") + (f.text or "") for f in junit.findall(".//failure")
    )
    assert rule in failures
    data = json.loads((report / "conformance.json").read_text())
    named = {f["rule"] for f in data["scenarios"][0]["findings"] if not f["expected"]} | {
        s["rule"] for s in data["scenarios"][0]["steps"] if not s["ok"]
    }
    assert rule in named
    assert not junit.findall(".//error"), "a TMS's answer is never the suite's error"
    if mutant.startswith("n-set-answers-"):
        answered = f"0x{mutant.rsplit('-', 1)[1].upper()}"
        assert f"N-SET answered with {answered}" in out, out


def test_a_request_the_suite_built_wrong_is_a_suite_error_not_a_tms_finding(
    tmp_path, capsys, monkeypatch
):
    """The suite checks its own N-SETs against PS3.4 Table CC.2.5-3 before a final
    transition it expects to succeed: a cancellation without its coded reason (Final State
    X) is the suite's fault, reported as a JUnit error, with no rule held against the TMS."""
    from emulator.conformance import scenarios as runner

    built = runner.cancel_dataset

    def without_code(*args):
        ds = built(*args)
        del ds.ProcedureStepProgressInformationSequence[
            0
        ].ProcedureStepDiscontinuationReasonCodeSequence
        return ds

    monkeypatch.setattr(runner, "cancel_dataset", without_code)
    devices = _devices()
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            peers=devices,
            seed_options=SMALL,
        )
    )
    name = "operator-cancel-before-beam-on"
    scenario = next(s for s in load_scenarios() if s.name == name)
    site.seed(scenario.station, 1)
    addresses = site.start()
    try:
        tms = Peer("TMS", "127.0.0.1", addresses["TMS"][1])
        archive = Peer("ARCHIVE", "127.0.0.1", addresses["ARCHIVE"][1])
        code = _run_cli(tms, archive, devices, tmp_path / "report", "--only", name)
    finally:
        site.stop()
    out = capsys.readouterr().out
    assert code == 1, out
    data = json.loads((tmp_path / "report" / "conformance.json").read_text())
    (result,) = data["scenarios"]
    assert result["error"].startswith("suite error:")
    assert "ProcedureStepDiscontinuationReasonCodeSequence" in result["error"]
    assert result["findings"] == []
    junit = ET.parse(tmp_path / "report" / "conformance-junit.xml").getroot()
    errors = [e.get("message", "") for e in junit.findall(".//error")]
    assert any("suite error" in e for e in errors), errors
    assert junit.get("errors") == "1"  # the root's count, as CI systems read it


def test_scenarios_list_prints_every_scenario_as_the_table_has_it(capsys):
    table = yaml.safe_load(
        (Path(__file__).parent.parent / "profiles" / "scenarios.yaml").read_text()
    )["scenarios"]
    assert main(["scenarios", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(table)
    for scenario, (head, title) in zip(
        table, zip(lines[::2], lines[1::2], strict=True), strict=True
    ):
        name, _, station, sessions, *rest = head.split()
        assert (name, station, int(sessions)) == (
            scenario["name"],
            scenario["station"],
            scenario["sessions"],
        )
        assert title.strip() == scenario["title"]
        only = " ".join(rest)
        assert ("tdw-ii only" in only) == (scenario.get("editions") == ["tdw-ii"]), head
        assert ("RT Plan missing" in only) == bool(scenario.get("inputs_missing")), head


def test_the_whole_suite_under_tdw_ii_with_trial_uids(tmp_path, capsys):
    """The TDW-II edition (RO-58..RO-65 numbering, its own scenario) and the trial UIDs of
    the draft supplement: the reference site passes every scenario, and the reports cite
    rules by their TDW-II transaction numbers."""
    devices = _devices()
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            peers=devices,
            seed_options=SMALL,
            edition="tdw-ii",
            uid_set="trial",
        )
    )
    site.seed_scenarios()
    addresses = site.start()
    try:
        tms = Peer("TMS", "127.0.0.1", addresses["TMS"][1])
        archive = Peer("ARCHIVE", "127.0.0.1", addresses["ARCHIVE"][1])
        report = tmp_path / "report"
        code = _run_cli(tms, archive, devices, report, "--profile", "tdw-ii", "--uids", "trial")
    finally:
        site.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((report / "conformance.json").read_text())
    names = [s["name"] for s in data["scenarios"]]
    assert sorted(names) == sorted(s.name for s in load_scenarios(edition="tdw-ii"))
    assert "dynamic-inputs-after-claim" in names and all(s["ok"] for s in data["scenarios"])
    cited = {step["rule"] for s in data["scenarios"] for step in s["steps"]}
    assert "RO-58/Response-count" in cited and not any(r.startswith("RO-17/") for r in cited)
    traffic = (report / "dimse-traffic.jsonl").read_text()
    assert "1.2.840.10008.5.1.4.34.4.3" in traffic  # UPS Pull, trial (not final .6.3)
    assert "1.2.840.10008.5.1.4.34.6.3" not in traffic
