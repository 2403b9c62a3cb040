"""The reports a TMS vendor reads: grouped findings, failing scenarios first, rules that
nothing exercised skipped, edition-aware citations, and an HTML timeline checked as
headless Chromium renders it (the screenshot is kept under test-artifacts/).

The TMS is the reference TMS with two planted defects: its worklist answers for one
station lose the station's Code Meaning (RO-17 Note 4, one finding per UPS per query), and
its N-GET returns the Transaction UID (PS3.4 CC.2.7.3).
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from emulator.cli import main
from emulator.conformance.suite import load_scenarios
from emulator.net.peers import Peer
from emulator.reference.site import ReferenceSite, SiteConfig
from emulator.seeding import SeedOptions
from tests.chromium import CHROMIUM, HeadlessChromium
from tests.conftest import free_port, require_tool

SMALL = SeedOptions(slices=8, rows=32, beams=3, dynamic_beams=1, control_points=6)
ARTIFACTS = Path(
    os.environ.get("TDW_ARTIFACT_DIR", Path(__file__).parent.parent / "test-artifacts")
)
SCENARIOS = (
    "normal-fraction",
    "pps-tdd-split",
    "operator-cancel-before-beam-on",
    "claim-in-progress",
)


def _plant_defects(site: ReferenceSite) -> None:
    original_find, original_get = site.tms._on_find, site.tms._on_n_get

    def on_find(event):
        for status, ds in original_find(event):
            station = (ds.get("ScheduledStationNameCodeSequence") or []) if ds else []
            if station and station[0].CodeValue == "TDWSC-NORMAL":
                del station[0].CodeMeaning
            yield status, ds

    def on_n_get(event):
        status, reply = original_get(event)
        if reply is not None:
            record = site.tms.ups.get(str(event.request.RequestedSOPInstanceUID))
            reply.TransactionUID = record.transaction_uid or "1.2.3"
        return status, reply

    site.tms._on_find, site.tms._on_n_get = on_find, on_n_get


def _judge(tmp_path: Path, edition: str, scenarios: tuple[str, ...], plant: bool) -> tuple:
    devices = [Peer("TDWEMU1", "127.0.0.1", free_port()), Peer("TDWEMU2", "127.0.0.1", free_port())]
    site = ReferenceSite(
        SiteConfig(
            data_dir=tmp_path / "site",
            tms_port=0,
            archive_port=0,
            peers=devices,
            seed_options=SMALL,
            edition=edition,
        )
    )
    for index, scenario in enumerate(s for s in load_scenarios() if s.name in scenarios):
        for _ in range(scenario.sessions):
            site.seed(scenario.station, index + 1)
    if plant:
        _plant_defects(site)
    addresses = site.start()
    report = tmp_path / "report"
    args = ["scenarios", "run", "--profile", edition, "--report-dir", str(report)]
    args += ["--tms", f"TMS@127.0.0.1:{addresses['TMS'][1]}"]
    args += ["--archive", f"ARCHIVE@127.0.0.1:{addresses['ARCHIVE'][1]}"]
    for device in devices:
        args += ["--device", str(device)]
    for name in scenarios:
        args += ["--only", name]
    try:
        code = main(args)
    finally:
        site.stop()
    return code, report


def test_grouped_findings_failing_first_skipped_rules_and_the_rendered_timeline(tmp_path, capsys):
    require_tool(CHROMIUM)
    code, report = _judge(tmp_path, "ihe-ro-2008", SCENARIOS, plant=True)
    out = capsys.readouterr().out
    assert code == 1, out

    # Terminal: one line per rule and attribute, with a count, then the first examples.
    note4 = [line for line in out.splitlines() if "RO-17/Note-4" in line and "[error]" in line]
    assert len(note4) == 1, out
    assert "times)" in note4[0]
    assert "profiles/" not in out and ".yaml" not in out  # citations name clauses, not files

    data = json.loads((report / "conformance.json").read_text())
    order = [s["name"] for s in data["scenarios"]]
    assert order == [
        "normal-fraction",
        "operator-cancel-before-beam-on",
        "claim-in-progress",
        "pps-tdd-split",
    ]  # failing first, each part in suite order
    # At its end the suite asks the state of every UPS a scenario claimed (to end any left
    # IN PROGRESS): claim-in-progress ended its own, and that N-GET meets the planted defect
    # (the Transaction UID returned) too.
    claim = data["scenarios"][2]
    assert claim["cleanup"] == []
    assert [f["rule"] for f in claim["findings"] if f["severity"] == "error"] == [
        "CC/N-GET-response"
    ]
    normal = data["scenarios"][0]
    [group] = [g for g in normal["finding_groups"] if g["rule"] == "RO-17/Note-4"]
    assert group["count"] == sum(f["rule"] == "RO-17/Note-4" for f in normal["findings"]) >= 4
    cancel = data["scenarios"][1]
    n_get = [f for f in cancel["findings"] if f["rule"] == "CC/N-GET-response"]
    assert n_get and "Transaction UID" in n_get[0]["message"]
    assert "CC.2.7.3" in n_get[0]["reference"]
    split = data["scenarios"][3]
    assert split["ok"] and "RO-25/Canceled-reply" in split["skipped_rules"]  # none canceled
    assert "CC/N-GET-response" in split["skipped_rules"]
    assert "CC/Retry-after-abort" in split["skipped_rules"]  # nothing aborted there
    assert "RO-17/Response-count" not in split["skipped_rules"]

    junit = ET.parse(report / "conformance-junit.xml").getroot()
    suites = junit.findall("testsuite")
    assert [s.get("name") for s in suites] == order
    skipped = junit.findall(".//testcase/skipped")
    assert skipped and junit.get("skipped") == str(len(skipped))
    assert float(junit.get("time")) > 0 and junit.get("errors") == "0"
    [note4_case] = [c for c in suites[0].findall("testcase") if c.get("name") == "RO-17/Note-4"]
    failure = note4_case.find("failure")
    assert "times)" in failure.text and "... and" in failure.text
    assert all("profiles/" not in (f.text or "") for f in junit.iter("failure"))

    html = report / "conformance.html"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with HeadlessChromium() as browser:
        browser.open(html)
        seen = browser.evaluate(
            """(() => {
            const visible = e => { const r = e.getBoundingClientRect();
              const s = getComputedStyle(e);
              return r.width > 0 && r.height > 0 && s.visibility !== 'hidden'
                && s.display !== 'none'; };
            const row = [...document.querySelectorAll('tr.finding-fail')]
              .find(r => r.textContent.includes('RO-17/Note-4'));
            const link = row.querySelector('a[href^="#msg-"]');
            const target = document.getElementById(link.getAttribute('href').slice(1));
            const labels = [...document.querySelectorAll('.m .lbl')];
            const byText = t => labels.find(l => l.textContent === t);
            const expected = byText('C302');
            const request = byText('N-ACTION');
            const names = [...document.querySelectorAll('.lane .name')];
            return {
              row: visible(row), link: visible(link), target: !!target && visible(target),
              targetStatus: target ? target.textContent : '',
              labels: labels.filter(visible).length,
              expectedClass: expected ? expected.parentElement.className : '',
              expectedColor: expected ? getComputedStyle(expected).color : '',
              requestColor: request ? getComputedStyle(request).color : '',
              cutNames: names.filter(n => n.scrollWidth > n.clientWidth + 1).length,
              lanes: names.length,
              firstH2: document.querySelector('h2').id,
            };
        })()"""
        )
        shot = browser.screenshot(ARTIFACTS / "conformance-report.png")
    assert seen["row"] and seen["link"] and seen["target"], seen
    assert "C-FIND" in seen["targetStatus"], seen  # the link lands on the exchange itself
    assert seen["labels"] > 20, seen
    assert "exp" in seen["expectedClass"], seen  # the expected C302 is styled as expected
    assert seen["expectedColor"] != seen["requestColor"], seen
    assert seen["lanes"] > 10 and seen["cutNames"] == 0, seen
    assert seen["firstH2"] == "normal-fraction"
    assert shot.stat().st_size > 20_000
    shutil.copy(html, ARTIFACTS / "conformance-report.html")


def test_a_tdw_ii_run_cites_ro_58_to_ro_65(tmp_path, capsys):
    scenarios = (
        "normal-fraction",
        "interruption-continuation",
        "dynamic-inputs-after-claim",
        "events-cancel-requested",
        "claim-in-progress",
    )
    code, report = _judge(tmp_path, "tdw-ii", scenarios, plant=False)
    out = capsys.readouterr().out
    assert code == 0, out
    junit = ET.parse(report / "conformance-junit.xml").getroot()
    names = {c.get("name") for c in junit.iter("testcase")}
    rules = {n.split(" [")[-1].rstrip("]") if "[" in n else n for n in names}
    cited = {r.split("/")[0] for r in rules if r.startswith("RO-")}
    assert {"RO-58", "RO-60", "RO-61", "RO-65"} <= cited, cited
    assert not cited & {f"RO-{n}" for n in range(17, 27)}, cited
    data = json.loads((report / "conformance.json").read_text())
    steps = [s["rule"] for sc in data["scenarios"] for s in sc["steps"]]
    assert "RO-58/Note-5-continuation" in steps and "RO-65/Canceled-reply" in steps
    after_claim = next(s for s in data["scenarios"] if s["name"] == "dynamic-inputs-after-claim")
    retrieve = next(s for s in after_claim["steps"] if s["action"] == "retrieve")
    assert retrieve["rule"] == "RO-61/Move-status" and retrieve["ok"], retrieve
    assert "PASS: 5 of 5" in out


def test_citations_name_clauses_never_files():
    """A vendor reads 'PS3.4 Table CC.1.1-2', not this project's file names."""
    from emulator.conformance.rulebook import RuleBook

    for edition in ("ihe-ro-2008", "tdw-ii"):
        for rule in RuleBook.load(edition).rules.values():
            text = f"{rule.reference} {rule.statement}"
            assert not any(part in text for part in (".yaml", ".md", ".py", "profiles/")), rule
            assert rule.reference.split()[0] in ("IHE-RO", "PS3.3", "PS3.4", "PS3.7"), rule


def test_an_expectation_shows_its_statuses_in_hex():
    """A report says 0xC302 as PS3.4 does, never the decimal 49922 (issue [8/8])."""
    from emulator.conformance.scenarios import _expect_text

    assert _expect_text({"status": 0xC302, "reply_state": "CANCELED"}) == (
        "{status: 0xC302, reply_state: CANCELED}"
    )
    assert _expect_text({"winners": 1, "losers_status": 0xC302}) == (
        "{winners: 1, losers_status: 0xC302}"
    )
    assert _expect_text(0xB304) == "0xB304"
    assert "49922" not in _expect_text({"status": 49922})
