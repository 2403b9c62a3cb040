"""The live summary while a soak runs, and the verdict table at its end (rich)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from emulator.soak.runner import Progress
from emulator.soak.verdict import Verdict

LINE_EVERY_S = 10.0  # without a terminal: one plain line this often


def progress_table(p: Progress, duration_s: float) -> Table:
    sessions = p.tally["sessions"]
    table = Table(title=f"tdw-emu soak: {p.phase} {p.elapsed_s:.0f} / {duration_s:.0f} s")
    for column in (
        "devices busy",
        "sessions",
        "completed",
        "interrupted",
        "canceled",
        "refused",
        "failed",
        "continuations",
        "records",
        "DIMSE p50 / p99 ms",
        "backlog",
        "RSS MiB",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{p.busy}/{p.devices}",
        str(sessions.get("started", 0)),
        str(sessions.get("completed", 0)),
        str(sessions.get("interrupted", 0)),
        str(sessions.get("canceled", 0)),
        str(sessions.get("refused", 0)),
        str(sessions.get("failed", 0)),
        str(p.tally["continuations_completed"]),
        str(p.tally["records_stored"]),
        f"{p.latency.get('p50_ms', 0):.1f} / {p.latency.get('p99_ms', 0):.1f}",
        f"{p.backlog:g}",
        f"{p.rss_mib:.0f}",
    )
    return table


class LiveSummary:
    """A live table on a terminal; a line every few seconds in a log or CI."""

    def __init__(self, console: Console, duration_s: float) -> None:
        self.console = console
        self.duration_s = duration_s
        self.live: Live | None = None
        self._last_line = 0.0

    def __enter__(self) -> LiveSummary:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __call__(self, p: Progress) -> None:
        if self.live is not None:
            self.live.update(progress_table(p, self.duration_s))
            return
        now = time.monotonic()
        if now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            s = p.tally["sessions"]
            print(
                f"[{p.phase} {p.elapsed_s:.0f}s] busy {p.busy}/{p.devices} "
                f"sessions {s.get('started', 0)} completed {s.get('completed', 0)} "
                f"interrupted {s.get('interrupted', 0)} records {p.tally['records_stored']} "
                f"p99 {p.latency.get('p99_ms', 0):.1f} ms backlog {p.backlog:g} "
                f"rss {p.rss_mib:.0f} MiB",
                flush=True,
            )


def verdict_tables(verdict: Verdict) -> list[Table]:
    summary = Table(title="soak verdict")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    s = verdict.sessions
    r = verdict.records
    m = verdict.memory
    rows = [
        ("devices", f"{verdict.devices} ({', '.join(f'{k} {v}' for k, v in verdict.mix.items())})"),
        ("ran / drained", f"{verdict.duration_s:g} s / {verdict.drain_s:g} s"),
        ("sessions started", str(s.get("started", 0))),
        ("sessions completed", str(s.get("completed", 0))),
        ("sessions interrupted (canceled)", str(s.get("interrupted", 0))),
        ("sessions canceled otherwise", str(s.get("canceled", 0))),
        ("sessions refused / failed", f"{s.get('refused', 0)} / {s.get('failed', 0)}"),
        ("sessions per minute", f"{verdict.sessions_per_minute:g}"),
        ("continuations completed", str(verdict.continuations_completed)),
        ("beams and channels delivered", str(r["delivered_beams"])),
        ("records stored / in the Archive", f"{r['records_stored']} / {r['records_in_archive']}"),
        ("records lost", str(r["lost_records"])),
        ("beams lost", str(r["lost_beams"])),
        ("beams recorded with another meterset", str(r["mismatched_beams"])),
        (
            "memory after warm-up -> end",
            f"{m['rss_after_warmup_mib']} -> {m['rss_end_mib']} MiB ({m['growth_mib']:+} MiB, "
            + (
                f"{m['growth_mib_per_hour']:+} MiB/h)"
                if m.get("growth_mib_per_hour") is not None
                else f"per hour: not from {m.get('window_s', 0):.0f} s)"
            ),
        ),
        *((f"limit {name}", f"{value:g}") for name, value in verdict.limits.items()),
        (
            "overload (new sessions held)",
            f"{verdict.overload.get('holds', 0)} time(s), {verdict.overload.get('held_s', 0):g} s"
            + (
                f" (peak recent p95 {verdict.overload.get('peak_recent_p95_ms', 0):g} ms)"
                if verdict.overload
                else ""
            ),
        ),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    latency = Table(title="DIMSE latency at the devices (request to final response)")
    for column in ("operation", "count", "p50 ms", "p90 ms", "p95 ms", "p99 ms"):
        latency.add_column(column, justify="right")
    for op, figures in verdict.latency_ms.items():
        latency.add_row(
            op,
            str(figures["count"]),
            f"{figures['p50_ms']:.2f}",
            f"{figures['p90_ms']:.2f}",
            f"{figures.get('p95_ms', 0):.2f}",
            f"{figures['p99_ms']:.2f}",
        )
    return [summary, latency]
