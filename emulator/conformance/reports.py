"""Writes a conformance run: terminal summary, JSON, JUnit XML, HTML timeline, traffic log.

JUnit holds one testcase per scenario step and one per rule per scenario, so CI systems
list exactly which clause a TMS broke. The HTML report is one self-contained file (inline
CSS, no scripts from elsewhere) with a timeline of the DIMSE messages per association.
"""

from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from emulator import terminal
from emulator.conformance.preflight import SetupProblem
from emulator.conformance.rulebook import Finding, RuleBook
from emulator.conformance.scenarios import ScenarioResult
from emulator.conformance.traffic import TrafficRecorder

REPORT_FILES = {
    "json": "conformance.json",
    "junit": "conformance-junit.xml",
    "html": "conformance.html",
    "traffic": "dimse-traffic.jsonl",
}


def suite_ok(results: list[ScenarioResult]) -> bool:
    return bool(results) and all(r.ok for r in results)


EXAMPLES = 3  # findings of a group shown in full; the rest are counted


@dataclass
class FindingGroup:
    """The findings of one rule on one attribute: one defect seen many times is one line,
    with a count and the first examples, not a hundred identical lines."""

    findings: list[Finding]

    @property
    def first(self) -> Finding:
        return self.findings[0]

    @property
    def count(self) -> int:
        return len(self.findings)

    @property
    def fails(self) -> bool:
        return self.first.fails

    def line(self) -> str:
        f = self.first
        mark = " (expected)" if f.expected else ""
        times = f" ({self.count} times)" if self.count > 1 else ""
        return (
            f"[{f.severity}] {f.rule}{mark}: {f.message}{times} | attribute "
            f"{f.attribute or '-'} | {f.reference}"
        )

    def examples(self) -> list[str]:
        lines = [f"  at {f.where}: {f.message}" for f in self.findings[:EXAMPLES] if f.where]
        if self.count > EXAMPLES:
            lines.append(f"  ... and {self.count - EXAMPLES} more")
        return lines


def group_findings(findings: list[Finding]) -> list[FindingGroup]:
    """Findings grouped by rule, attribute and whether they were provoked; failing groups
    first, then in the order they were first made."""
    groups: dict[tuple, FindingGroup] = {}
    for finding in findings:
        key = (finding.rule, finding.attribute, finding.expected)
        groups.setdefault(key, FindingGroup([])).findings.append(finding)
    return sorted(groups.values(), key=lambda g: not g.fails)


def failing_first(results: list[ScenarioResult]) -> list[ScenarioResult]:
    """Failing scenarios first (in suite order), then the passing ones."""
    return sorted(results, key=lambda r: r.ok)


def as_json(results: list[ScenarioResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "ok": suite_ok(results),
        "scenarios": [
            {
                "name": r.scenario.name,
                "title": r.scenario.title,
                "reference": r.scenario.reference,
                "station": r.scenario.station,
                "ok": r.ok,
                "seconds": r.seconds,
                "error": r.error,
                "steps": [vars(s) for s in r.steps],
                "findings": [f.as_json() for f in r.findings],
                "finding_groups": [
                    {
                        "rule": g.first.rule,
                        "attribute": g.first.attribute,
                        "severity": g.first.severity,
                        "expected": g.first.expected,
                        "count": g.count,
                        "message": g.first.message,
                        "reference": g.first.reference,
                    }
                    for g in group_findings(r.findings)
                ],
                "skipped_rules": r.skipped_rules,
                "cleanup": r.cleanup,
            }
            for r in failing_first(results)
        ],
    }


def write_junit(results: list[ScenarioResult], book: RuleBook, path: Path) -> Path:
    suites = ET.Element("testsuites", name="tdw-emu conformance")
    total = failures = errors = skipped = 0
    for result in failing_first(results):
        suite = ET.SubElement(suites, "testsuite", name=result.scenario.name)
        cases = 0
        failed = 0
        not_run = 0
        for step in result.steps:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{result.scenario.name}.steps",
                name=f"{step.index:02d} {step.action} [{step.rule}]",
                time=f"{step.seconds:.3f}",
            )
            cases += 1
            if not step.ok:
                failed += 1
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=f"{step.rule}: expected {step.expected}, observed {step.observed}",
                )
                failure.text = f"{step.message}\nrule {step.rule}: {_rule_text(book, step.rule)}"
        if result.error:
            case = ET.SubElement(
                suite, "testcase", classname=f"{result.scenario.name}.suite", name="suite"
            )
            cases += 1
            ET.SubElement(case, "error", message=result.error[:500]).text = result.error
        by_rule: dict[str, list[Finding]] = defaultdict(list)
        for finding in result.findings:
            by_rule[finding.rule].append(finding)
        for rule in book.rules.values():
            case = ET.SubElement(
                suite, "testcase", classname=f"{result.scenario.name}.rules", name=rule.cited
            )
            cases += 1
            groups = group_findings(by_rule.get(rule.cited, []))
            failing = [g for g in groups if g.fails]
            if failing:
                failed += 1
                failure = ET.SubElement(
                    case, "failure", message=f"{rule.cited}: {failing[0].first.message}"[:500]
                )
                failure.text = _group_text(failing)
            elif groups:
                ET.SubElement(case, "system-out").text = _group_text(groups)
            elif rule.cited in result.skipped_rules:
                not_run += 1
                ET.SubElement(case, "skipped", message="not exercised by this scenario")
        suite.set("tests", str(cases))
        suite.set("failures", str(failed))
        suite.set("errors", "1" if result.error else "0")
        suite.set("skipped", str(not_run))
        suite.set("time", f"{result.seconds:.3f}")
        total += cases
        failures += failed
        errors += bool(result.error)
        skipped += not_run
    # CI systems read the root's counts and time (JUnit XML as Jenkins and GitLab parse it).
    suites.set("tests", str(total))
    suites.set("failures", str(failures))
    suites.set("errors", str(errors))
    suites.set("skipped", str(skipped))
    suites.set("time", f"{sum(r.seconds for r in results):.3f}")
    ET.indent(suites)
    path.write_bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True))
    return path


def _group_text(groups: list[FindingGroup]) -> str:
    return "\n".join(line for g in groups for line in (g.line(), *g.examples()))


def _rule_text(book: RuleBook, rule_id: str) -> str:
    rule = book.rules.get(rule_id) or next(
        (r for r in book.rules.values() if r.cited == rule_id), None
    )
    return f"{rule.statement} ({rule.reference})" if rule else ""


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;text-align:left}
.ok{color:#17692b;font-weight:600}.fail{color:#b3261e;font-weight:600}.warn{color:#8a5a00}
.skip{color:#666}
.legend span{display:inline-block;margin-right:1.2em;font-size:.8em}
.lane{display:flex;align-items:stretch;border-bottom:1px dotted #ddd}
.lane .name{flex:0 0 20em;font-size:.75em;padding:.2em .5em .2em 0;word-break:break-word}
.track{position:relative;flex:1 1 auto;height:48px}
.bar{position:absolute;top:21px;height:6px;background:#d7e3f4;border-radius:3px}
.bar.abort{background:#f4d0cc}
.m{position:absolute;top:16px;width:7px;height:16px;margin-left:-3px;border-radius:2px}
.m .lbl{position:absolute;left:-2px;font-size:10px;line-height:11px;white-space:nowrap;
 color:#333}
.m.up .lbl{top:-15px}.m.down .lbl{top:18px}
.m.rq{background:#3867b5}.m.rs{background:#2e8b57}.m.pend{background:#9aa5b1}
.m.bad{background:#b3261e}.m.bad .lbl{color:#b3261e;font-weight:700}
.m.exp{background:#fff;border:2px dashed #8a5a00;width:5px;height:12px}
.m.exp .lbl{color:#8a5a00;font-style:italic}
tr.bad td{background:#fbe9e7}tr.exp td{background:#fff8e1}
:target td{outline:2px solid #3867b5}
details{margin:.3em 0}
"""

_LEGEND = (
    "<p class='legend'><span><b style='color:#3867b5'>&#9646;</b> request</span>"
    "<span><b style='color:#2e8b57'>&#9646;</b> success</span>"
    "<span><b style='color:#9aa5b1'>&#9646;</b> pending</span>"
    "<span><b style='color:#8a5a00'>&#9647;</b> error status the scenario expected "
    "(e.g. C302 for a second claim)</span>"
    "<span><b style='color:#b3261e'>&#9646;</b> unexpected error status</span></p>"
)


def _expected_statuses(result: ScenarioResult) -> dict[str, int]:
    """The error status each step of the scenario set out to provoke, by traffic label."""
    wanted = {}
    for index, step in enumerate(result.scenario.steps, start=1):
        expect = step.get("expect") or {}
        for status in (expect.get("status"), expect.get("losers_status")):
            if isinstance(status, int) and status & 0xF000 in (0xA000, 0xC000):
                wanted[f"{result.scenario.name}/{index}-{step['action']}"] = status
    return wanted


def _status_class(message, expected: dict[str, int]) -> str:
    if not message.is_response:
        return "rq"
    if message.status in (0xFF00, 0xFF01):
        return "pend"
    if message.status is not None and (message.status & 0xF000) in (0xA000, 0xC000):
        return "exp" if expected.get(message.label) == message.status else "bad"
    return "rs"


def _marker_label(message) -> str:
    """What a marker shows: the operation of a request, the status of a response."""
    if not message.is_response:
        return message.name[:-3]
    return "" if message.status is None else f"{message.status:04X}"


def _run_labels(lane: list, expected: dict[str, int]) -> list[str]:
    """A label per marker of one lane: requests above, responses below; a run of equal
    labels (forty C-STOREs answered 0000) is labelled once, at its start, with its count."""
    labels = [""] * len(lane)
    for is_response in (False, True):
        run_start, run_label, count = None, None, 0
        for index, m in enumerate(lane):
            if m.is_response != is_response or _status_class(m, expected) == "pend":
                continue
            label = _marker_label(m)
            if label == run_label:
                count += 1
                labels[run_start] = f"{label} ×{count}"
                continue
            run_start, run_label, count = index, label, 1
            labels[index] = label
    return labels


def _timeline(recorder: TrafficRecorder, result: ScenarioResult) -> str:
    messages = recorder.between(result.first_seq, result.last_seq)
    if not messages:
        return "<p>No DIMSE traffic.</p>"
    numbers = sorted({m.association for m in messages})
    assocs = [recorder.associations[n] for n in numbers if n in recorder.associations]
    start = min([m.time for m in messages] + [a.opened for a in assocs])
    end = max([m.time for m in messages] + [a.closed or a.opened for a in assocs])
    span = max(end - start, 1e-3)
    expected = _expected_statuses(result)

    def x(t: float) -> float:
        return round((t - start) / span * 100, 3)

    lanes = [
        f"<p>Time axis: 0 to {span * 1000:.0f} ms from the scenario's first message. "
        "Requests are labelled with their operation, responses with their status; pending "
        "C-FIND/C-MOVE responses are not labelled.</p>",
        _LEGEND,
    ]
    for assoc in assocs:
        closed = assoc.closed or end
        bar = "bar abort" if assoc.ended_by == "abort" else "bar"
        marks = []
        lane = [m for m in messages if m.association == assoc.number]
        labels = _run_labels(lane, expected)
        for m, label in zip(lane, labels, strict=True):
            css = _status_class(m, expected)
            side = "down" if m.is_response else "up"
            status = "" if m.status is None else f" 0x{m.status:04X}"
            summary = ", ".join(f"{k}={v}" for k, v in m.summary().items())
            tip = html.escape(
                f"{(m.time - start) * 1000:.1f} ms {m.direction} {m.name}{status} {summary}"
            )
            marks.append(
                f'<a class="m {css} {side}" href="#msg-{m.seq}" style="left:{x(m.time)}%" '
                f'title="{tip}"><span class="lbl">{html.escape(label)}</span></a>'
            )
        name = html.escape(
            f"#{assoc.number} {assoc.local_ae} {'→' if assoc.role == 'requestor' else '←'} "
            f"{assoc.peer_ae} ({assoc.ended_by or 'open'})"
        )
        width = max(x(closed) - x(assoc.opened), 0.3)
        lanes.append(
            f'<div class="lane"><span class="name">{name}</span><div class="track">'
            f'<div class="{bar}" style="left:{x(assoc.opened)}%;width:{width}%"></div>'
            + "".join(marks)
            + "</div></div>"
        )
    rows = []
    for m in messages:
        status = "" if m.status is None else f"0x{m.status:04X}"
        summary = ", ".join(f"{k}={v}" for k, v in m.summary().items())
        css = _status_class(m, expected)
        rows.append(
            f"<tr id='msg-{m.seq}' class='{css if css in ('bad', 'exp') else ''}'>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    m.seq,
                    f"{(m.time - start) * 1000:.1f}",
                    m.association,
                    m.direction,
                    m.name,
                    status,
                    m.sop_instance_uid,
                    summary,
                )
            )
            + "</tr>"
        )
    opened = " open" if not result.ok else ""
    table = (
        f"<details{opened}><summary>{len(messages)} DIMSE messages</summary><table><tr>"
        "<th>#</th><th>ms</th><th>assoc</th><th>dir</th><th>message</th><th>status</th>"
        "<th>instance</th><th>summary</th></tr>" + "".join(rows) + "</table></details>"
    )
    return "".join(lanes) + table


def _findings_table(result: ScenarioResult) -> str:
    groups = group_findings(result.findings)
    if not groups:
        return "<p class='ok'>No findings.</p>"
    parts = [
        "<table class='findings'><tr><th>rule</th><th>severity</th><th>count</th>"
        "<th>message (first)</th><th>attribute</th><th>reason</th><th>reference</th>"
        "<th>first exchanges</th></tr>"
    ]
    for group in groups:
        f = group.first
        css = "warn" if f.severity == "warning" or f.expected else "fail"
        severity = f.severity + (" (expected)" if f.expected else "")
        links = " ".join(
            f"<a href='#msg-{e.seq}'>message #{e.seq}</a>" if e.seq else html.escape(e.where)
            for e in group.findings[:EXAMPLES]
        )
        more = f" and {group.count - EXAMPLES} more" if group.count > EXAMPLES else ""
        parts.append(
            f"<tr class='{'finding-fail' if group.fails else 'finding'}'>"
            f"<td class='{css}'>{html.escape(f.rule)}</td>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (severity, group.count, f.message, f.attribute, f.reason, f.reference)
            )
            + f"<td>{links}{more}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def write_html(
    results: list[ScenarioResult], recorder: TrafficRecorder, meta: dict[str, Any], path: Path
) -> Path:
    ok = suite_ok(results)
    results = failing_first(results)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>tdw-emu conformance report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>tdw-emu conformance report: ",
        f"<span class='{'ok' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span></h1>",
        "<table>",
    ]
    for key, value in meta.items():
        parts.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table><table><tr><th>scenario</th><th>result</th><th>steps</th>")
    parts.append("<th>failing findings</th><th>rules skipped</th><th>s</th></tr>")
    for r in results:
        failing = sum(1 for f in r.findings if f.fails)
        parts.append(
            f"<tr><td><a href='#{r.scenario.name}'>{html.escape(r.scenario.name)}</a></td>"
            f"<td class='{'ok' if r.ok else 'fail'}'>{'pass' if r.ok else 'FAIL'}</td>"
            f"<td>{sum(s.ok for s in r.steps)}/{len(r.steps)}</td><td>{failing}</td>"
            f"<td>{len(r.skipped_rules)}</td><td>{r.seconds:.2f}</td></tr>"
        )
    parts.append("</table>")
    for r in results:
        parts.append(
            f"<h2 id='{html.escape(r.scenario.name)}'>{html.escape(r.scenario.name)}: "
            f"{html.escape(r.scenario.title)} "
            f"<span class='{'ok' if r.ok else 'fail'}'>{'pass' if r.ok else 'FAIL'}</span></h2>"
            f"<p>{html.escape(r.scenario.reference)}; station {html.escape(r.scenario.station)}"
            "</p><table><tr><th>#</th><th>action</th><th>rule</th><th>expected</th>"
            "<th>observed</th><th>result</th><th>s</th></tr>"
        )
        for s in r.steps:
            parts.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(v))}</td>"
                    for v in (s.index, s.action, s.rule, s.expected, f"{s.observed} {s.message}")
                )
                + f"<td class='{'ok' if s.ok else 'fail'}'>{'pass' if s.ok else 'FAIL'}</td>"
                f"<td>{s.seconds:.2f}</td></tr>"
            )
        parts.append("</table>")
        parts.append(_findings_table(r))
        if r.skipped_rules:
            parts.append(
                "<p class='skip'>Skipped (nothing in this scenario exercised them): "
                + html.escape(", ".join(r.skipped_rules))
                + "</p>"
            )
        if r.cleanup:
            parts.append(
                "<p class='skip'>Left IN PROGRESS by the scenario, and what the suite did: "
                + html.escape("; ".join(r.cleanup))
                + "</p>"
            )
        parts.append("<h3>DIMSE timeline per association</h3>")
        parts.append(_timeline(recorder, r))
    parts.append("</body></html>")
    path.write_text("".join(parts), encoding="utf-8")
    return path


def write_reports(
    results: list[ScenarioResult],
    recorder: TrafficRecorder,
    book: RuleBook,
    meta: dict[str, Any],
    report_dir: Path,
) -> dict[str, Path]:
    """All four report formats plus the traffic log, under ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: report_dir / file for name, file in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(as_json(results, meta), indent=2, default=str))
    write_junit(results, book, paths["junit"])
    write_html(results, recorder, meta, paths["html"])
    recorder.write_log(paths["traffic"])
    return paths


def write_setup_errors(
    problems: list[SetupProblem], meta: dict[str, Any], report_dir: Path
) -> dict[str, Path]:
    """The reports of a run that pre-flight stopped: every problem is a JUnit ``<error>``
    (the TMS was not judged, so nothing failed), and no rule was applied."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: report_dir / REPORT_FILES[name] for name in ("json", "junit", "html")}
    errors = [{"check": p.check, "message": p.message} for p in problems]
    document = {**meta, "ok": False, "setup_errors": errors, "scenarios": []}
    paths["json"].write_text(json.dumps(document, indent=2))
    suites = ET.Element("testsuites", name="tdw-emu conformance")
    suite = ET.SubElement(suites, "testsuite", name="pre-flight")
    for problem in problems:
        case = ET.SubElement(suite, "testcase", classname="pre-flight", name=problem.check)
        ET.SubElement(case, "error", message=str(problem)[:500]).text = str(problem)
    for element in (suite, suites):
        element.set("tests", str(len(problems)))
        element.set("failures", "0")
        element.set("errors", str(len(problems)))
        element.set("time", "0.000")
    ET.indent(suites)
    paths["junit"].write_bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True))
    rows = "".join(
        f"<tr><td>{html.escape(p.check)}</td><td>{html.escape(p.message)}</td></tr>"
        for p in problems
    )
    paths["html"].write_text(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>tdw-emu conformance report</title><style>{_CSS}</style></head><body>"
        "<h1>tdw-emu conformance report: <span class='fail'>SETUP ERROR</span></h1>"
        "<p>The suite did not run: the TMS was not judged.</p>"
        f"<table><tr><th>check</th><th>problem</th></tr>{rows}</table></body></html>",
        encoding="utf-8",
    )
    return paths


def print_summary(results: list[ScenarioResult], console: Console | None = None) -> None:
    """The terminal summary: one row per scenario, then every failing step and finding."""
    console = console or terminal.console()
    table = Table(title="tdw-emu conformance")
    for column in ("scenario", "result", "steps", "failing findings", "s"):
        table.add_column(column)
    results = failing_first(results)
    for r in results:
        table.add_row(
            r.scenario.name,
            "[green]pass[/green]" if r.ok else "[red]FAIL[/red]",
            f"{sum(s.ok for s in r.steps)}/{len(r.steps)}",
            str(sum(1 for f in r.findings if f.fails)),
            f"{r.seconds:.2f}",
        )
    console.print(table)
    for r in results:
        for s in r.steps:
            if not s.ok:
                console.out(
                    f"FAIL {r.scenario.name} step {s.index} {s.action} [{s.rule}]: "
                    f"expected {s.expected}, observed {s.observed} {s.message}".rstrip()
                )
        for note in r.cleanup:
            console.out(f"{r.scenario.name}: {note}")
        for group in group_findings(r.findings):
            if group.fails or group.first.severity == "warning":
                console.out(f"{r.scenario.name}: {group.line()}")
                for line in group.examples():
                    console.out(line)
    verdict = "PASS" if suite_ok(results) else "FAIL"
    console.out(f"{verdict}: {sum(r.ok for r in results)} of {len(results)} scenarios passed")
