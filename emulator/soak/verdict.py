"""What a soak run counts while it goes, and the verdict at its end.

The question a soak answers is "did anything get lost?": every beam a device reports as
delivered must be in an RT Beams Treatment Record that the Archive holds, and no record may
claim more meterset than the device measured. The rest (sessions, continuations, latency,
memory) says whether the TMS kept up over time.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from emulator.performer.workflow import UpsOutcome, session_outcome
from emulator.results.brachy_record import delivered_channel_times

METERSET_TOLERANCE = 1e-3  # MU; records carry metersets to 4 decimals
# The counts of an :func:`audit_records` result (beside its "problems").
AUDIT_COUNTS = (
    "delivered_beams",
    "records_stored",
    "records_in_archive",
    "lost_records",
    "lost_beams",
    "mismatched_beams",
)


def resident_memory_bytes() -> int:
    """The process's resident set now (Linux /proc), or its peak where /proc is absent."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class DeliveryRecord:
    """One delivery UPS: the beams the device measured and the records it stored for them."""

    ae_title: str
    ups: str
    state: str
    delivery_type: str
    delivered: dict[int, float]
    records: list[str]


@dataclass
class Tally:
    """Thread-safe counts, fed by every device thread after each worklist round."""

    sessions: Counter = field(default_factory=Counter)
    ups: Counter = field(default_factory=Counter)
    deliveries: list[DeliveryRecord] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    # Rounds the TMS could not be reached in (refused, timed out, dropped): retried later,
    # so counted but not a failure; a lasting outage shows as no completed sessions.
    transients: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ae_title: str, outcomes: list[UpsOutcome]) -> None:
        by_session: dict[str, list[UpsOutcome]] = {}
        for outcome in outcomes:
            by_session.setdefault(outcome.session, []).append(outcome)
        with self._lock:
            for group in by_session.values():
                verdict = session_outcome(group)
                self.sessions[verdict] += 1
                if verdict != "refused":
                    self.sessions["started"] += 1
            for outcome in outcomes:
                self.ups[outcome.state] += 1
                if outcome.step == "delivery" and outcome.state != "REFUSED":
                    self.deliveries.append(
                        DeliveryRecord(
                            ae_title,
                            outcome.sop_instance_uid,
                            outcome.state,
                            outcome.delivery_type,
                            dict(outcome.delivered),
                            list(outcome.stored),
                        )
                    )

    def error(self, text: str) -> None:
        with self._lock:
            self.errors[text[:200]] += 1

    def transient(self, text: str) -> None:
        with self._lock:
            self.transients[text[:200]] += 1

    def snapshot(self) -> dict:
        with self._lock:
            deliveries = list(self.deliveries)
            sessions = dict(self.sessions)
        continuations = [d for d in deliveries if d.delivery_type == "CONTINUATION"]
        return {
            "sessions": sessions,
            "deliveries": len(deliveries),
            "continuations_completed": sum(d.state == "COMPLETED" for d in continuations),
            "records_stored": sum(len(d.records) for d in deliveries),
        }


def recorded_amounts(record: Dataset) -> dict[int, float]:
    """What a record says was delivered: MU per beam (RT Beams Treatment Record), or
    source seconds per channel (RT Brachy Treatment Record)."""
    amounts = {
        int(item.ReferencedBeamNumber): float(item.get("DeliveredPrimaryMeterset", 0) or 0)
        for item in record.get("TreatmentSessionBeamSequence") or []
    }
    amounts.update(delivered_channel_times(record))
    return amounts


def audit_records(
    deliveries: list[DeliveryRecord], archived: Callable[[str], Dataset | None]
) -> dict:
    """Delivered beams against the records the Archive holds.

    ``archived(uid)`` returns the Archive's copy of a record (or a copy whose presence the
    Archive confirmed), None when it does not hold it.
    """
    delivered_beams = lost_beams = lost_records = mismatched = 0
    held = 0
    problems: list[str] = []
    for delivery in deliveries:
        beams = {b: mu for b, mu in delivery.delivered.items() if mu > 0}
        delivered_beams += len(beams)
        recorded: dict[int, float] = {}
        for uid in delivery.records:
            record = archived(uid)
            if record is None:
                lost_records += 1
                problems.append(f"{delivery.ae_title}: record {uid} is not in the Archive")
                continue
            held += 1
            for number, amount in recorded_amounts(record).items():
                recorded[number] = recorded.get(number, 0.0) + amount
        for number, mu in beams.items():
            if number not in recorded:
                lost_beams += 1
                problems.append(
                    f"{delivery.ae_title}: beam {number} ({mu:g} MU) of {delivery.ups} "
                    "is in no archived record"
                )
            elif abs(recorded[number] - mu) > METERSET_TOLERANCE:
                mismatched += 1
                problems.append(
                    f"{delivery.ae_title}: beam {number} recorded {recorded[number]:g} MU, "
                    f"the device measured {mu:g}"
                )
    return {
        "delivered_beams": delivered_beams,
        "records_stored": sum(len(d.records) for d in deliveries),
        "records_in_archive": held,
        "lost_records": lost_records,
        "lost_beams": lost_beams,
        "mismatched_beams": mismatched,
        "problems": problems[:50],
    }


def sum_audits(audits: list[dict]) -> dict:
    """Several :func:`audit_records` results (devices, workers) as one."""
    total = {key: sum(audit.get(key, 0) for audit in audits) for key in AUDIT_COUNTS}
    problems = [problem for audit in audits for problem in audit.get("problems", [])]
    return total | {"problems": problems[:50]}


@dataclass
class Verdict:
    devices: int
    mix: dict[str, int]
    duration_s: float
    drain_s: float
    sessions: dict[str, int]
    sessions_per_minute: float
    deliveries: dict[str, int]
    continuations_completed: int
    records: dict
    latency_ms: dict
    memory: dict
    tms: dict
    errors: dict[str, int]
    problems: list[str]
    # Worklist rounds in which the TMS could not be reached and was asked again later.
    retried_rounds: int = 0
    interrupted_left: int = 0  # interrupted deliveries without a completed continuation
    limits: dict = field(default_factory=dict)  # SoakLimits.as_json(): what was judged
    # Admission control (emulator/soak/admission.py): how often and how long new sessions
    # were held because the process was overloaded, and why.
    overload: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2))
        return path


def judge(
    tally: Tally,
    records: dict,
    tms: dict,
    interrupted_left: int,
) -> list[str]:
    """Why the run failed, or nothing."""
    problems = []
    if records["lost_records"] or records["lost_beams"]:
        problems.append(
            f"{records['lost_records']} records and {records['lost_beams']} delivered beams lost"
        )
    if records["mismatched_beams"]:
        problems.append(f"{records['mismatched_beams']} beams recorded with another meterset")
    for outcome in ("failed", "canceled"):
        if tally.sessions.get(outcome):
            problems.append(f"{tally.sessions[outcome]} sessions {outcome}")
    if tally.errors:
        problems.append(f"{sum(tally.errors.values())} errors in device loops")
    if tms.get("in_progress", 0):
        problems.append(f"{tms['in_progress']} UPS left IN PROGRESS at the TMS")
    if interrupted_left:
        problems.append(
            f"{interrupted_left} interrupted deliveries without a completed continuation"
        )
    if not tally.sessions.get("completed"):
        problems.append("no session completed")
    return problems


# An hourly growth rate drawn from less than this many seconds after warm-up is noise (a
# few MiB of allocator slack in 10 s reads as hundreds of MiB an hour): not reported, and
# not judged; the growth itself (MiB) still is.
MIN_GROWTH_WINDOW_S = 600.0


@dataclass(frozen=True)
class SoakLimits:
    """What a soak must stay within, from the command line; None: not judged.

    Latency limits apply to every DIMSE operation the devices requested (and to "all");
    memory limits to the resident set after the warm-up.
    """

    p95_ms: float | None = None
    p99_ms: float | None = None
    rss_growth_mib: float | None = None
    rss_growth_mib_per_hour: float | None = None

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def overload_problem(overload: dict, devices: int) -> list[str]:
    """An overloaded run is named as such: its figures are the emulator's, not the TMS's."""
    if not overload.get("holds"):
        return []
    return [
        f"overloaded: new sessions were held {overload['holds']} time(s), "
        f"{overload['held_s']:g} s in all ({overload.get('why') or 'beyond the bounds'}); "
        f"this machine could not hold {devices} devices at this pace (profiles/soak.yaml)"
    ]


def merge_overloads(parts: list[dict]) -> dict:
    """The workers' admission figures as one: holds and time summed, peaks the worst."""
    seen = [p for p in parts if p]
    if not seen:
        return {}
    return {
        "holds": sum(p["holds"] for p in seen),
        "held_s": round(sum(p["held_s"] for p in seen), 1),
        "peak_recent_p95_ms": max(p["peak_recent_p95_ms"] for p in seen),
        "peak_results_backlog": max(p["peak_results_backlog"] for p in seen),
        "why": next((p["why"] for p in seen if p.get("why")), ""),
        "limits": seen[0]["limits"],
    }


def judge_limits(limits: SoakLimits, latency_ms: dict, memory: dict) -> list[str]:
    """Each limit the run went beyond, with the measured figure; or why one was not judged
    (as a problem: a limit asked for and not judged is not a pass)."""
    problems = []
    for quantile, limit in (("p95", limits.p95_ms), ("p99", limits.p99_ms)):
        if limit is None:
            continue
        for operation, figures in latency_ms.items():
            value = figures.get(f"{quantile}_ms")
            if value is not None and value > limit:
                problems.append(
                    f"{operation} {quantile} latency {value:.1f} ms is over the limit {limit:g} ms"
                )
    growth = memory.get("growth_mib")
    if limits.rss_growth_mib is not None and growth is not None and growth > limits.rss_growth_mib:
        problems.append(
            f"resident memory grew {growth:.1f} MiB after the warm-up, over the limit "
            f"{limits.rss_growth_mib:g} MiB"
        )
    if limits.rss_growth_mib_per_hour is not None:
        rate = memory.get("growth_mib_per_hour")
        if rate is None:
            problems.append(
                f"memory growth per hour not judged: {memory.get('window_s', 0):.0f} s after "
                f"the warm-up, {MIN_GROWTH_WINDOW_S:.0f} s needed (run longer, or limit "
                "--max-rss-growth-mib instead)"
            )
        elif rate > limits.rss_growth_mib_per_hour:
            problems.append(
                f"resident memory grew {rate:.1f} MiB/h, over the limit "
                f"{limits.rss_growth_mib_per_hour:g} MiB/h"
            )
    return problems


class MemoryWatch:
    """Resident memory at start, after warm-up, and at the end (the growth is end - warm)."""

    def __init__(self, warmup_s: float) -> None:
        self.started = time.monotonic()
        self.warmup_s = warmup_s
        self.start_bytes = resident_memory_bytes()
        self.warm_bytes: int | None = None
        self.peak_bytes = self.start_bytes

    def sample(self) -> int:
        now = resident_memory_bytes()
        self.peak_bytes = max(self.peak_bytes, now)
        if self.warm_bytes is None and time.monotonic() - self.started >= self.warmup_s:
            self.warm_bytes = now
        return now

    def summary(self) -> dict:
        end = self.sample()
        warm = self.warm_bytes if self.warm_bytes is not None else self.start_bytes
        window = max(time.monotonic() - self.started - self.warmup_s, 0.0)
        mib = 1024 * 1024
        per_hour = None
        if window >= MIN_GROWTH_WINDOW_S:
            per_hour = round((end - warm) / mib / (window / 3600), 1)
        return {
            "rss_start_mib": round(self.start_bytes / mib, 1),
            "rss_after_warmup_mib": round(warm / mib, 1),
            "rss_end_mib": round(end / mib, 1),
            "rss_peak_mib": round(self.peak_bytes / mib, 1),
            "growth_mib": round((end - warm) / mib, 1),
            "growth_mib_per_hour": per_hour,
            "window_s": round(window, 1),
            "warmup_s": self.warmup_s,
        }
