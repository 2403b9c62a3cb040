"""``tdw-emu``: parses arguments and delegates; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from emulator import __version__
from emulator.cli_events import (
    CONSOLE_ACTIONS,
    add_console_flags,
    add_watch,
    cmd_tms_console,
    cmd_watch,
)
from emulator.cli_help import describe
from emulator.interrupts import EXIT_INTERRUPTED

if TYPE_CHECKING:  # the soak modules are imported only by the soak command
    from emulator.soak.verdict import Verdict


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM TLS (all associations, both directions)")
    g.add_argument("--tls-cert", type=Path, help="this AE's certificate (PEM)")
    g.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    g.add_argument("--tls-ca", type=Path, help="CA certificate(s) that peers must chain to")
    g.add_argument(
        "--tls-no-client-auth",
        action="store_true",
        default=None,
        help="accept callers without a certificate (default: require one)",
    )


def _add_admission_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admission (no single peer can stall the server)")
    g.add_argument("--tls-handshake-timeout", type=float, help="seconds (default 5)")
    g.add_argument(
        "--association-request-timeout",
        type=float,
        help="seconds a connection has to send its A-ASSOCIATE-RQ (default 5)",
    )
    g.add_argument(
        "--max-pending-per-address",
        type=int,
        help="connections waiting for admission from one address (default 64)",
    )
    g.add_argument("--max-pending-connections", type=int, help="in all (default 256)")
    g.add_argument("--max-associations", type=int, help="associations at once (default 32)")


def _admission_values(args: argparse.Namespace) -> dict:
    from emulator.config import ADMISSION_SETTINGS

    return {k: getattr(args, k, None) for k in ADMISSION_SETTINGS}


def _tls_values(args: argparse.Namespace) -> dict:
    return {
        k: getattr(args, k, None) for k in ("tls_cert", "tls_key", "tls_ca", "tls_no_client_auth")
    }


def _tls_banner(network) -> str:
    """Whether a server speaks TLS, and whether callers must show a certificate."""
    if network.tls is None:
        return "TLS off: plain DICOM on every association"
    mode = "required" if network.tls.require_peer_certificate else "not required"
    return f"TLS on (1.2 or later), client certificate {mode}"


def _add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (0: free)")
    p.add_argument("--metrics-host", help="address for /metrics (default 127.0.0.1)")


def _serve_metrics(values: dict, metrics):
    """Starts /metrics when a port is configured; prints where, for scrapers and scripts."""
    from emulator.config import metrics_endpoint

    endpoint = metrics_endpoint(values)
    if endpoint is None:
        return None
    server = metrics.serve(*endpoint)
    print(f"metrics on {server.url}", flush=True)
    return server


def _add_seed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seed", help="write synthetic RT patients (CT, RTSTRUCT, RTPLAN, ...)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--patients", type=int, default=1)
    p.add_argument("--slices", type=int, default=40, help="CT slices")
    p.add_argument("--slice-spacing", type=float, default=2.5, help="CT slice spacing, mm")
    p.add_argument("--rows", type=int, default=128, help="CT rows and columns")
    p.add_argument("--pixel-spacing", type=float, default=3.0, help="CT pixel spacing, mm")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--dynamic-beams", type=int, default=2, help="how many beams are DYNAMIC")
    p.add_argument("--control-points", type=int, default=20, help="per DYNAMIC beam")
    p.add_argument("--fractions", type=int, default=30)
    p.add_argument("--dose-per-fraction", type=float, default=2.0, help="Gy")
    p.add_argument("--dose-bits", type=int, choices=(16, 32), default=16)
    p.add_argument("--uids", choices=("final", "trial"), default="final")
    p.add_argument("--patient-id-prefix", default="TDW")
    p.add_argument(
        "--kind",
        choices=("linac", "afterloader"),
        default="linac",
        help="linac: photon IMRT plans; afterloader: HDR brachytherapy plans (Ir-192, for "
        "the simulated afterloader's source today)",
    )
    p.add_argument("--channels", type=int, default=3, help="afterloader: catheters")
    p.add_argument("--dwells", dest="dwells_per_channel", type=int, default=6, help="per channel")
    p.add_argument(
        "--channel-time",
        type=float,
        default=60.0,
        help="afterloader: seconds per channel for the source at its reference strength",
    )


def _add_archive(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="run the reference Archive (Storage, FIND, MOVE SCP)")
    p.add_argument("--config", type=Path, help="YAML file; flags override it")
    p.add_argument(
        "--data-dir", type=Path, help="required (here or in --config): its store and index"
    )
    p.add_argument("--ae-title", help="the Archive's AE title (default: ARCHIVE)")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="0 picks a free port (default: 11112)")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="a caller that is also a C-MOVE destination (repeatable)",
    )
    p.add_argument("--allow", action="append", default=[], metavar="AET", help="extra caller")
    p.add_argument(
        "--accept-any-ae",
        action="store_true",
        default=None,
        help="accept any calling AE title (default: --peer and --allow only)",
    )
    p.add_argument(
        "--duplicate-policy",
        choices=("reject", "replace"),
        help="an instance stored again (default: reject)",
    )
    p.add_argument("--uids", choices=("final", "trial"), help="UID set (default: final)")
    p.add_argument("--import", dest="import_dir", type=Path, help="preload files from a dir")
    _add_tls_flags(p)
    _add_admission_flags(p)


def _add_tms(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tms",
        help="run the reference TMS with its Archive; schedule, list or cancel its UPS",
    )
    p.add_argument("--config", type=Path, help="YAML file (key 'tms'); flags override it")
    p.add_argument(
        "--data-dir", type=Path, help="required: its UPS store, Archive and seeded patients"
    )
    p.add_argument(
        "--import",
        dest="import_dir",
        type=Path,
        help="store the DICOM files under this directory in the Archive first (e.g. "
        "tdw-emu seed's output)",
    )
    p.add_argument("--ae-title", help="the TMS's AE title (default: TMS)")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="TMS port; 0 picks a free port (default: 11114)")
    p.add_argument("--archive-ae-title", help="its Archive's AE title (default: ARCHIVE)")
    p.add_argument(
        "--archive-port", type=int, help="Archive port; 0 picks a free port (default: 11112)"
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="a device (caller and C-MOVE destination); repeatable",
    )
    p.add_argument("--allow", action="append", default=[], metavar="AET", help="extra caller")
    p.add_argument(
        "--seed",
        action="append",
        default=[],
        metavar="STATION",
        help="store a synthetic patient and schedule a session for STATION",
    )
    p.add_argument(
        "--seed-afterloader",
        action="append",
        default=[],
        metavar="STATION",
        help="store a synthetic HDR brachytherapy patient and schedule its fraction (one "
        "delivery UPS) for the afterloader at STATION",
    )
    p.add_argument(
        "--seed-scenarios",
        action="store_true",
        default=None,
        help="schedule the sessions the scenario suite needs (tdw-emu scenarios list)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="forget the objects, UPS and seeded patients a previous run left in --data-dir "
        "before starting (with --seed-scenarios: a clean TMS for the next suite run)",
    )
    p.add_argument(
        "--load-kit",
        type=Path,
        metavar="DIR",
        help="load a 'tdw-emu scenarios prepare' kit: its patient data, TMS objects and UPS",
    )
    p.add_argument(
        "--accept-any-ae",
        action="store_true",
        default=None,
        help="accept any calling AE title (default: --peer and --allow only)",
    )
    p.add_argument(
        "--profile",
        choices=("ihe-ro-2008", "tdw-ii"),
        help="profile edition (default: ihe-ro-2008)",
    )
    p.add_argument("--uids", choices=("final", "trial"), help="UID set (default: final)")
    p.add_argument(
        "--fault-refuse-canceled",
        metavar="N|always",
        help="fault injection for testing performers: refuse the first N acceptable "
        "CANCELED transitions (or every one) with C304",
    )
    p.add_argument(
        "--fault-hold-reply",
        action="append",
        metavar="STATE=SECONDS",
        help="fault injection: accept a change to STATE (in-progress, completed, canceled), "
        "then hold the N-ACTION reply this long; repeatable",
    )
    p.add_argument(
        "--max-request-bytes", type=int, help="largest N-CREATE/N-SET/C-FIND body (1 MiB)"
    )
    p.add_argument(
        "--feed",
        metavar="PATTERN",
        help="keep stations matching PATTERN (e.g. 'SOAK*') supplied with sessions as they "
        "query: a soak whose devices run elsewhere",
    )
    p.add_argument("--feed-for", metavar="DURATION", help="stop feeding after this (e.g. 10m)")
    p.add_argument(
        "--feed-prime",
        action="append",
        default=[],
        metavar="STATION",
        help="schedule this station's first session before listening (repeatable)",
    )
    p.add_argument(
        "--seed-size",
        choices=("standard", "small"),
        help="small: the soak's small synthetic patients",
    )
    _add_metrics_flags(p)
    _add_tls_flags(p)
    _add_admission_flags(p)
    actions = p.add_subparsers(dest="action", metavar="{schedule,list,cancel}")
    schedule = actions.add_parser(
        "schedule",
        help="schedule a plan's fractions at a station, in a TMS's data directory",
    )
    schedule.add_argument("--config", type=Path, help="YAML file (key 'tms'): its data_dir")
    schedule.add_argument("--data-dir", type=Path, help="required: the TMS's data directory")
    schedule.add_argument("--plan-uid", help="RT Plan SOP Instance UID held by the Archive")
    schedule.add_argument("--patient-id", help="or: the plan of this patient")
    schedule.add_argument("--station", help="required: station code (Scheduled Station Name)")
    schedule.add_argument(
        "--kind",
        choices=("linac", "afterloader"),
        help="the machine the plan is for, checked against the plan: linac (4 UPS a "
        "session) or afterloader (one brachytherapy delivery UPS a fraction)",
    )
    schedule.add_argument(
        "--fractions", type=int, default=1, help="how many sessions, one per weekday"
    )
    schedule.add_argument("--first-fraction", type=int, default=1, help="number of the first")
    schedule.add_argument("--start", help="first session start, YYYYMMDDHHMM (default: now)")
    schedule.add_argument(
        "--weekends",
        action="store_true",
        help="a session every day, Saturday and Sunday too (default: weekdays only)",
    )
    schedule.add_argument(
        "--profile",
        choices=("ihe-ro-2008", "tdw-ii"),
        help="profile edition (default: ihe-ro-2008)",
    )
    schedule.add_argument("--uids", choices=("final", "trial"), help="UID set (default: final)")
    add_console_flags(actions, _add_tls_flags)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an emulated performing device (PPS, PDS or TDD)")
    p.add_argument("--config", type=Path, help="YAML file (key 'run'); flags override it")
    p.add_argument(
        "--kind",
        choices=("pds", "pps", "tdd", "afterloader"),
        help="required (here or in --config): PDS all four steps, PPS positioning, TDD "
        "delivery, afterloader HDR brachytherapy delivery (default device sim:afterloader)",
    )
    p.add_argument("--station", help="required: the Scheduled Station Name code value to query for")
    p.add_argument("--tms", metavar="AET@HOST:PORT", help="required: the TMS")
    p.add_argument("--archive", metavar="AET@HOST:PORT", help="required: its Archive")
    p.add_argument("--ae-title", help="this device's AE title (default: the kind, e.g. PDS1)")
    p.add_argument("--listen-port", type=int, help="Storage SCP port for C-MOVE results")
    p.add_argument("--listen-host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--profile", choices=("ihe-ro-2008", "tdw-ii"), help="(default: ihe-ro-2008)")
    p.add_argument("--uids", choices=("final", "trial"), help="(default: final)")
    p.add_argument(
        "--time-scale", type=float, help="1 real time, 0 as fast as possible (default: 0)"
    )
    p.add_argument(
        "--sessions",
        help="sessions to perform, or 'all': until the worklist has nothing more for this "
        "device (default 1)",
    )
    p.add_argument(
        "--wait", type=float, help="seconds to wait for work on the worklist (default: 0)"
    )
    p.add_argument(
        "--interrupt",
        metavar="BEAM:MU",
        help="trip an interlock at BEAM:MU; for an afterloader CHANNEL:SECONDS, the door "
        "opening that many seconds of source time into the channel",
    )
    p.add_argument(
        "--device",
        help="device backend and its address (default sim): sim[:PROFILE], "
        "serial:///dev/ttyUSB0?baudrate=57600&parity=E, tcp://HOST:PORT, rfc2217://HOST:PORT, "
        f"socket://HOST:PORT; backends found: {', '.join(_backends())}",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="its journal, results and retrieved objects (default: "
        "$XDG_STATE_HOME/tdw-emulator/devices/AE-STATION, so the same command resumes)",
    )
    p.add_argument(
        "--report-dir", type=Path, help="write run-report.json and the DIMSE traffic log here"
    )
    p.add_argument(
        "--tms-retry-window",
        type=float,
        metavar="SECONDS",
        help="keep retrying an exchange with an unreachable TMS this long (default 120)",
    )
    p.add_argument(
        "--dimse-timeout",
        type=float,
        metavar="SECONDS",
        help="wait this long for a reply from the TMS or the Archive (default 60)",
    )
    p.add_argument(
        "--progress-every",
        type=float,
        metavar="SECONDS",
        help="RO-26 progress at least this often while a step runs "
        "(default: report_every_s of profiles/progress.yaml, 10)",
    )
    _add_metrics_flags(p)
    _add_tls_flags(p)


def _controller_quirks() -> list[str]:
    """The controller simulator's deliberate breakages (hil/controller_sim.py QUIRKS)."""
    from hil.controller_sim import QUIRKS

    return sorted(QUIRKS)


def _backends() -> list[str]:
    """Built-in and entry-point device backends (docs/drivers.md), for --help."""
    from devices.registry import backends

    return backends()


def _add_hil(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hil", help="bench-rig tools: the controller simulator")
    hil_sub = p.add_subparsers(dest="hil_command", required=True)
    sim = hil_sub.add_parser("controller-sim", help="serve a simulated controller")
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--serial", metavar="PTY", help="'auto' creates a pty pair; or a device")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen here (port 0: a free one)")
    sim.add_argument("--machine", default="linac", help="machine profile name or YAML path")
    sim.add_argument("--time-scale", type=float, default=1.0)
    sim.add_argument("--control-port", type=int, default=0, help="fault-injection channel")
    sim.add_argument(
        "--break",
        dest="quirks",
        action="append",
        default=[],
        metavar="QUIRK",
        help="run a deliberately broken variant, to see tdw-emu hil check fail on the clause "
        "it breaks (repeatable): " + ", ".join(_controller_quirks()),
    )
    check = hil_sub.add_parser(
        "check",
        help="check a controller against hil/PROTOCOL.md",
    )
    check.add_argument("--device", required=True, help="serial://, tcp://, rfc2217://, socket://")
    check.add_argument("--junit", type=Path, help="also write a JUnit XML report here")
    check.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="CHECK",
        help="run only this check, by the name the report gives it (repeatable)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="embedded TMS and Archive, and a PDS through a fraction")
    p.add_argument("--data-dir", type=Path, help="keep the demo's data here (default: temp)")
    p.add_argument(
        "--kind",
        choices=("pds", "afterloader"),
        default="pds",
        help="pds: a linac session of four steps; afterloader: an HDR brachytherapy fraction",
    )
    p.add_argument(
        "--interrupt",
        metavar="BEAM:MU",
        help="interlock, then the CONTINUATION; for an afterloader CHANNEL:SECONDS (the door)",
    )
    p.add_argument("--time-scale", type=float, default=0.02)


def _add_scenarios(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scenarios", help="conformance scenarios against a TMS and its Archive")
    actions = p.add_subparsers(dest="scenarios_action", required=True)
    actions.add_parser("list", help="the scenarios, their stations and what they need")
    prepare = actions.add_parser(
        "prepare",
        help="write what a TMS under test must hold: patient data, UPS per station, notes",
    )
    prepare.add_argument("--out", type=Path, required=True, help="directory for the kit")
    prepare.add_argument("--date", help="the day the suite will run, YYYY-MM-DD (default today)")
    prepare.add_argument("--tms-ae", default="TMS", help="the TMS's AE title (references)")
    prepare.add_argument("--archive-ae", default="ARCHIVE", help="the Archive's AE title")
    prepare.add_argument("--profile", choices=("ihe-ro-2008", "tdw-ii"), default="ihe-ro-2008")
    prepare.add_argument("--uids", choices=("final", "trial"), default="final")
    prepare.add_argument(
        "--seed-size", choices=("standard", "small"), default="standard",
        help="small: fewer, smaller CT slices (a quick kit)",
    )  # fmt: skip
    run = actions.add_parser("run", help="run the suite and write the reports")
    run.add_argument("--tms", metavar="AET@HOST:PORT", required=True)
    run.add_argument("--archive", metavar="AET@HOST:PORT", required=True)
    run.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="an emulated device's AE and the address its C-MOVE receiver is reached at "
        "(two needed; defaults TDWEMU1@127.0.0.1:11130 and TDWEMU2@127.0.0.1:11131)",
    )
    run.add_argument(
        "--listen-host",
        help="address the devices' receivers bind (default: each --device host), e.g. "
        "0.0.0.0 when the TMS reaches this machine at another address",
    )
    run.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run this scenario only (repeatable; default: every scenario of the profile)",
    )
    run.add_argument(
        "--dimse-timeout",
        type=float,
        metavar="SECONDS",
        help="a reply later than this is a DIMSE/Reply finding; the suite still waits "
        "longer to read it (default: exchange_timeout_s of profiles/rules.yaml, 30)",
    )
    run.add_argument(
        "--report-dir",
        type=Path,
        default=Path("conformance-report"),
        help="where the JSON, JUnit, HTML and traffic reports go",
    )
    run.add_argument("--profile", choices=("ihe-ro-2008", "tdw-ii"), default="ihe-ro-2008")
    run.add_argument("--uids", choices=("final", "trial"), default="final")
    run.add_argument("--data-dir", type=Path, help="keep the devices' data here (default: temp)")
    _add_tls_flags(run)


def _add_soak(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="many emulated devices for a long time, and a verdict")
    p.add_argument("--devices", type=int, required=True, help="emulated devices in all")
    p.add_argument("--duration", required=True, help="how long to feed work: 300, 300s, 5m, 8h")
    p.add_argument(
        "--mix",
        help="units by weight, e.g. pds=0.5,pps+tdd=0.3,afterloader=0.2 (default pds=1)",
    )
    p.add_argument(
        "--fault-rate", type=float, default=0.0, help="chance of an interlock in each beam"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--embedded", action="store_true", help="the reference TMS and Archive")
    where.add_argument("--tms", metavar="AET@HOST:PORT", help="an external TMS")
    p.add_argument("--archive", metavar="AET@HOST:PORT", help="its Archive (with --tms)")
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument(
        "--listen-port",
        type=int,
        default=0,
        help="one port where every device receives, by its AE title (0: free)",
    )
    p.add_argument(
        "--no-watch",
        action="store_true",
        help="devices do not subscribe to the UPS they claim (no UPS event traffic)",
    )
    p.add_argument(
        "--spawn-rate",
        type=float,
        help="devices started a second (default: the fleet spread over about one session)",
    )
    p.add_argument(
        "--locust",
        action="store_true",
        help="run the devices as Locust users (a master and --workers local workers); "
        "Locust's CSV and HTML reports go to --locust-report",
    )
    p.add_argument("--locust-report", type=Path, default=Path("locust-report"))
    p.add_argument(
        "--metrics-targets",
        type=Path,
        default=Path("soak-targets.json"),
        help="with --metrics-port and workers: every process's /metrics, for Prometheus "
        "file_sd_configs",
    )
    p.add_argument(
        "--locust-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed on to the Locust master, e.g. --locust-arg=--loglevel=WARNING",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="device processes, the TMS in one more (default: one per core; "
        "0: everything in this process)",
    )
    p.add_argument(
        "--max-associations",
        type=int,
        help="associations at once, per server (default: 2 per device, at least 32)",
    )
    p.add_argument("--station-prefix", default="SOAK", help="stations are PREFIX001, ...")
    p.add_argument("--time-scale", type=float, default=0.02, help="1 real time")
    p.add_argument(
        "--drain",
        type=float,
        help="seconds to finish the worklists (default 60 + 240 x time scale)",
    )
    p.add_argument("--profile", choices=("ihe-ro-2008", "tdw-ii"), default="ihe-ro-2008")
    p.add_argument("--uids", choices=("final", "trial"), default="final")
    p.add_argument(
        "--device",
        default="",
        help="device backend spec (default: each kind's simulated machine)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of the fault injection")
    p.add_argument(
        "--admit-p95",
        type=float,
        metavar="SECONDS",
        help="start no new session while the devices' recent DIMSE p95 is above this "
        "(default: max_recent_p95_s of profiles/soak.yaml, 5)",
    )
    p.add_argument("--data-dir", type=Path, help="keep the run's data here (default: temp)")
    p.add_argument("--json", type=Path, default=Path("soak-verdict.json"), help="verdict file")
    p.add_argument(
        "--config",
        type=Path,
        help="YAML file (key 'soak'): any of these options by their long name with '_' "
        "for '-' (e.g. tls_cert, metrics_port, max_p99_ms); flags override it",
    )
    limits = p.add_argument_group(
        "limits", "the verdict fails when the run goes beyond one (default: not judged)"
    )
    limits.add_argument(
        "--max-p95-ms", type=float, help="95th percentile of every DIMSE operation, ms"
    )
    limits.add_argument(
        "--max-p99-ms", type=float, help="99th percentile of every DIMSE operation, ms"
    )
    limits.add_argument(
        "--max-rss-growth-mib", type=float, help="resident memory growth after the warm-up, MiB"
    )
    limits.add_argument(
        "--max-rss-growth-mib-per-hour",
        type=float,
        help="the same per hour; judged on runs of 10 minutes or more after the warm-up",
    )
    _add_metrics_flags(p)
    _add_tls_flags(p)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="apply the Appendix A rules to DICOM files at rest")
    p.add_argument("files", nargs="+", type=Path, help="files or directories")
    p.add_argument("--profile", choices=("ihe-ro-2008", "tdw-ii"), default="ihe-ro-2008")
    p.add_argument("--uids", choices=("final", "trial"), default="final")
    p.add_argument("--json", type=Path, help="also write the findings here")


DESCRIPTION = """\
Emulated IHE-RO Treatment Delivery Workflow performing devices (PPS, PDS, TDD) that talk
DICOM to a Treatment Management System and its Archive, a strict reference TMS and
Archive to run them against, a conformance suite that judges a TMS, and soak runs of many
devices.

First steps:
  tdw-emu demo                       the whole workflow on the embedded reference TMS
  tdw-emu scenarios run --help       judge your TMS
  tdw-emu COMMAND --help             every option of a command, with its default
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default that is a value (not None, False or an empty list):
    a user should not have to read the code to learn that soak runs at 0.02.

    Descriptions are filled to the terminal's width paragraph by paragraph, except
    paragraphs with indented lines (examples, command lists), which are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paragraphs = text.strip("\n").split("\n\n")
        return (
            "\n\n".join(
                paragraph
                if any(line.startswith(" ") for line in paragraph.splitlines())
                or paragraph.startswith("example")
                else textwrap.fill(
                    " ".join(paragraph.split()),
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                )
                for paragraph in paragraphs
            )
            + "\n"
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        """The help with its default said once (unless the text says it already, or there
        is no value to say) and a required option marked "required"."""
        text = action.help or ""
        if action.required and action.option_strings and "required" not in text:
            text = f"required: {text}" if text else "required"
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or not action.option_strings
            or action.required
            or default in (None, False, [], "", argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser formats its help the same way."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tdw-emu", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tdw-emu {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_seed(sub)
    _add_archive(sub)
    _add_tms(sub)
    _add_run(sub)
    _add_hil(sub)
    _add_demo(sub)
    _add_scenarios(sub)
    _add_validate(sub)
    _add_soak(sub)
    add_watch(sub, _add_tls_flags)
    sub.add_parser(
        "locustfile", help="print the packaged locustfile's path, for locust -f on any machine"
    )
    describe(parser)
    return parser


SEED_SUMMARY_TAGS = [
    "Modality", "PatientID", "PatientName", "StudyInstanceUID", "SOPInstanceUID", "RTPlanLabel",
]  # fmt: skip


def _cmd_seed(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from pydicom import dcmread

    from emulator.seeding import SeedOptions, seed_patients

    options = SeedOptions(**{f.name: getattr(args, f.name) for f in fields(SeedOptions)})
    written = seed_patients(args.out, options)
    for paths in written:
        print(f"{paths[0].parent}: {len(paths)} objects")
        # What `tdw-emu tms schedule --plan-uid` and a TMS vendor need, without dcmdump.
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=SEED_SUMMARY_TAGS)
            if ds.get("Modality") == "RTPLAN":
                print(
                    f"  patient {ds.PatientID} ({ds.PatientName}), study "
                    f"{ds.StudyInstanceUID}, RT Plan {ds.SOPInstanceUID} ({ds.RTPlanLabel})"
                )
    return 0


def _wait_for_signal() -> str:
    """Serves until SIGINT or SIGTERM; returns its name."""
    stop = threading.Event()
    received: list[str] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    stop.wait()
    return received[0] if received else "stop"


def _cmd_archive(args: argparse.Namespace) -> int:
    from emulator.config import archive_config, load_yaml_config, merge
    from emulator.reference.archive import ArchiveServer
    from emulator.store.importer import dicom_files, import_files

    flags = {
        "data_dir": args.data_dir,
        "ae_title": args.ae_title,
        "host": args.host,
        "port": args.port,
        "peer": args.peer,
        "allow": args.allow,
        "accept_any_ae": args.accept_any_ae,
        "duplicate_policy": args.duplicate_policy,
        "uids": args.uids,
        "import_dir": args.import_dir,
        **_tls_values(args),
        **_admission_values(args),
    }
    values = merge(load_yaml_config(args.config, "archive"), flags)
    config = archive_config(values)
    server = ArchiveServer(config)
    if values.get("import_dir"):
        results = import_files(server.store, dicom_files(Path(values["import_dir"])))
        refused = {p: r for p, r in results.items() if isinstance(r, Exception)}
        print(f"imported {len(results) - len(refused)} objects, refused {len(refused)}")
        for path, reason in refused.items():
            print(f"  refused {path}: {reason}", file=sys.stderr)
    host, port = server.start()
    callers = "any" if config.accept_any_ae else ", ".join(config.calling_allow_list() or [])
    print(f"archive {config.ae_title} listening on {host}:{port}", flush=True)
    print(f"  data dir {config.data_dir}, {server.store.count()} instances", flush=True)
    print(f"  accepted callers: {callers}", flush=True)
    print(f"  {_tls_banner(config.network)}", flush=True)
    for peer in server.peers:
        print(f"  move destination {peer}", flush=True)
    try:
        name = _wait_for_signal()
    finally:
        server.stop()
    print(f"stopped by {name}: the Archive closed; its objects stay in {config.data_dir}")
    return EXIT_INTERRUPTED


def _cmd_tms(args: argparse.Namespace) -> int:

    if args.action in CONSOLE_ACTIONS:
        return cmd_tms_console(args, _tls_values(args))
    if args.action == "schedule":
        return _cmd_tms_schedule(args)

    from emulator.config import load_yaml_config, merge, site_config
    from emulator.metrics import default_metrics
    from emulator.reference.site import ReferenceSite, forget_site

    flags = {
        "data_dir": args.data_dir,
        "ae_title": args.ae_title,
        "host": args.host,
        "port": args.port,
        "archive_ae_title": args.archive_ae_title,
        "archive_port": args.archive_port,
        "peer": args.peer,
        "allow": args.allow,
        "seed": args.seed,
        "seed_afterloader": args.seed_afterloader,
        "seed_scenarios": args.seed_scenarios,
        "accept_any_ae": args.accept_any_ae,
        "profile": args.profile,
        "uids": args.uids,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "fault_refuse_canceled": args.fault_refuse_canceled,
        "fault_hold_reply": args.fault_hold_reply,
        "max_request_bytes": args.max_request_bytes,
        "feed": args.feed,
        "feed_for": args.feed_for,
        "feed_prime": args.feed_prime,
        "seed_size": args.seed_size,
        **_tls_values(args),
        **_admission_values(args),
    }
    values = merge(load_yaml_config(args.config, "tms"), flags)
    config = site_config(values)
    if args.fresh:
        for path in forget_site(config.data_dir):
            print(f"  forgot {path}", flush=True)
    metrics = default_metrics()
    config.network = dataclasses.replace(
        config.network,
        observers=metrics.observers,
        on_connection_refused=metrics.connection_refused,
    )
    site = ReferenceSite(config, metrics)
    # Everything it holds is in place before it listens: a caller that connects as soon as
    # the port accepts finds the sessions (tests/test_docs_commands.py connects so).
    try:
        _fill_site(site, args, values)
    except BaseException:
        site.stop()
        raise
    addresses = site.start()
    metrics_server = _serve_metrics(values, metrics)
    try:
        for ae_title, (host, port) in addresses.items():
            role = "tms" if ae_title == config.tms_ae_title else "archive"
            print(f"{role} {ae_title} listening on {host}:{port}", flush=True)
        callers = (
            "any"
            if config.accept_any_ae
            else ", ".join(
                dict.fromkeys([*(p.ae_title for p in config.peers), *config.allowed_callers])
            )
        )
        print(f"  profile {config.edition}, UIDs {config.uid_set}, callers: {callers}", flush=True)
        print(f"  {_tls_banner(config.network)}", flush=True)
        print("ready", flush=True)
        name = _wait_for_signal()
    finally:
        if metrics_server:
            metrics_server.stop()
        site.stop()
    print(
        f"stopped by {name}: the TMS and its Archive closed; their UPS and objects stay in "
        f"{config.data_dir}"
    )
    return EXIT_INTERRUPTED


def _fill_site(site, args: argparse.Namespace, values: dict) -> None:
    """What ``tdw-emu tms`` stores and schedules before it listens: --import, --seed,
    --load-kit and --seed-scenarios, each said in a line."""
    if args.import_dir:
        imported = site.import_into_archive(args.import_dir)
        print(f"  imported {imported} object(s) from {args.import_dir} into the Archive")
    for index, station in enumerate(values.get("seed") or [], start=1):
        session_id = site.seed(station, index)
        print(f"  seeded session {session_id} for station {station}: 4 UPS", flush=True)
    first = len(values.get("seed") or []) + 1
    for index, station in enumerate(values.get("seed_afterloader") or [], start=first):
        session_id = site.seed(station, index, kind="afterloader")
        print(
            f"  seeded HDR brachytherapy session {session_id} for afterloader {station}: 1 UPS",
            flush=True,
        )
    if args.load_kit:
        from emulator.conformance.vendor_kit import load_kit

        created = load_kit(site, args.load_kit)
        print(f"  loaded kit {args.load_kit}: {created} UPS", flush=True)
    if values.get("seed_scenarios"):
        seeded = site.seed_scenarios(
            first_index=len(values.get("seed") or [])
            + len(values.get("seed_afterloader") or [])
            + 1
        )
        print(f"  seeded {len(seeded)} scenario sessions (tdw-emu scenarios list)", flush=True)


def _cmd_tms_schedule(args: argparse.Namespace) -> int:
    """``tdw-emu tms schedule``: sessions for a plan the site's Archive holds; nothing listens,
    so no caller need be allowed."""
    import datetime as dt

    from emulator.config import load_yaml_config, merge, site_config
    from emulator.reference.site import ReferenceSite

    values = merge(
        load_yaml_config(args.config, "tms"),
        {"data_dir": args.data_dir, "profile": args.profile, "uids": args.uids},
    )
    if not values.get("data_dir") or not args.station:
        raise ValueError("tms schedule needs --data-dir (the TMS's) and --station")
    if not (Path(values["data_dir"]) / "tms").is_dir():
        raise ValueError(
            f"--data-dir {values['data_dir']} holds no TMS: give the directory a 'tdw-emu tms "
            "--data-dir' used (it holds tms/ and archive/)"
        )
    values["accept_any_ae"] = True  # nothing listens: the callers play no part
    try:
        start = (
            dt.datetime.strptime(args.start, "%Y%m%d%H%M")
            if args.start
            else dt.datetime.now().replace(second=0, microsecond=0)
        )
    except ValueError as exc:
        raise ValueError(f"--start {args.start!r} is not YYYYMMDDHHMM") from exc
    site = ReferenceSite(site_config(values))
    try:
        plan_uid = args.plan_uid or site.archive_plan_uid(args.patient_id)
        if args.kind:
            site.check_plan_kind(plan_uid, args.kind)
        sessions = site.tms.scheduler.schedule_fractions(
            plan_uid, args.station, start, args.fractions, args.first_fraction, args.weekends
        )
    finally:
        site.stop()
    for session_id in sessions:
        print(f"scheduled session {session_id} at {args.station} (plan {plan_uid})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:

    from rich.table import Table

    from devices.base import DeviceError
    from emulator import terminal
    from emulator.config import RUN_SETTINGS, device_config, load_yaml_config, merge
    from emulator.conformance.message_rules import CheckContext, check_traffic
    from emulator.conformance.rulebook import RuleBook
    from emulator.conformance.traffic import TrafficRecorder
    from emulator.interrupts import EXIT_INTERRUPTED, GracefulStop
    from emulator.metrics import default_metrics
    from emulator.net.scu import AssociationRejected, DimseError
    from emulator.performer.runner import RunReport, reach_tms, run_sessions
    from emulator.performer.workflow import PerformingDevice
    from emulator.profile import load_profile

    flags = {k: getattr(args, k, None) for k in RUN_SETTINGS}  # some are YAML-only
    values = merge(load_yaml_config(args.config, "run"), flags)
    recorder = TrafficRecorder(keep_stored_objects=True)
    report = RunReport()
    stop = GracefulStop()
    with stop.installed():
        config, sessions, wait, report_dir = device_config(values)
        # Every message the device receives is judged by the same rules as the scenarios.
        metrics = default_metrics()
        config.network = dataclasses.replace(
            config.network, observers=(*recorder.handlers, *metrics.observers)
        )
        profile = load_profile(config.edition, config.uid_set)
        try:
            with PerformingDevice(config, metrics=metrics) as device:
                stop.on_stop(device.stop_work)
                _say_what_is_resumed(device)
                reach_tms(device)
                metrics_server = _serve_metrics(values, metrics)
                try:
                    report = run_sessions(device, sessions, wait)
                finally:
                    if metrics_server:
                        metrics_server.stop()
        except (OSError, DeviceError, DimseError) as exc:
            if isinstance(exc, AssociationRejected) and exc.permanent:
                raise  # a set-up problem: main() says it in one sentence and exits 2
            # The device could not start (a port in use, a controller that does not answer):
            # one line, the report and the traffic log all the same.
            logging.getLogger("tdw.device").debug("device start failed", exc_info=True)
            report.problems.append(f"the device could not run: {type(exc).__name__}: {exc}")
        context = CheckContext(
            profile,
            RuleBook.load(config.edition),
            config.tms.ae_title,
            config.archive.ae_title,
            afterloader_stations=frozenset(
                [config.station] if config.kind == "afterloader" else []
            ),
        )
    # Reported, not judged: the verdict on a TMS is 'tdw-emu scenarios run'.
    report.findings = [f.as_json() for f in check_traffic(recorder, context)]
    table = Table(title=f"tdw-emu run: {config.kind.upper()} {config.ae_title} at {config.station}")
    for column in ("UPS", "step", "state", "delivered MU", "stored", "reason"):
        table.add_column(column)
    for o in report.outcomes:
        mu = ", ".join(f"{b}: {m:g}" for b, m in o.delivered.items())
        table.add_row(o.label, o.step, o.state, mu, str(len(o.stored)), o.reason[:60])
    terminal.console().print(table)
    for finding in report.findings:
        print(f"[{finding['severity']}] {finding['rule']}: {finding['message']}")
    if report_dir:
        print(f"report written to {report.write(Path(report_dir))}")
        print(f"DIMSE traffic log {recorder.write_log(Path(report_dir) / 'dimse-traffic.jsonl')}")
    for pending in report.final_pending:
        print(
            f"final transition pending: UPS {pending['ups']} ({pending['step']}) still IN "
            f"PROGRESS at the TMS, {pending['target']} not accepted ({pending['reason']}); "
            "the next run on this --data-dir retries it",
            file=sys.stderr,
        )
    if stop.requested:
        print(_stopped_sentence(stop, report, config.data_dir), file=sys.stderr)
        return EXIT_INTERRUPTED
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def _say_what_is_resumed(device) -> None:
    """One line at start: where the device keeps its journal, and what an earlier run
    left there that this one ends first."""
    pending = device.journal.open_claims()
    unsent = device.outbox.pending()
    left = []
    if pending:
        left.append(f"{len(pending)} UPS claimed by an earlier run, ended first")
    if unsent:
        left.append(f"{len(unsent)} result(s) not yet in the Archive, sent first")
    said = f" ({'; '.join(left)})" if left else ""
    print(f"device journal in {device.config.data_dir}{said}", flush=True)


def _stopped_sentence(stop, report, data_dir: Path) -> str:
    """What a stop by signal left, in one sentence."""
    canceled = [o for o in report.outcomes if o.state == "CANCELED" and not o.settled]
    skipped = [o for o in report.outcomes if o.state == "SKIPPED"]
    text = (
        f"stopped by {stop.signal_name}: {len(canceled)} UPS canceled as an operator hold "
        f"(CID 9300 110513) with the record of what the machine measured, {len(skipped)} "
        "left SCHEDULED"
    )
    if report.final_pending:
        return (
            f"{text}; {len(report.final_pending)} UPS still IN PROGRESS at the TMS (it did "
            f"not take the end): the same command, journal {data_dir}, ends them"
        )
    return f"{text}; nothing left IN PROGRESS"


def parse_duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``8h`` to seconds."""
    from emulator.config import parse_seconds

    return parse_seconds(text)


def _apply_config_file(args: argparse.Namespace, section: str) -> None:
    """Fills the options the command line left unset from the YAML file's ``section``.

    A key must be one of the command's options (its long name, '_' for '-'); a flag given
    on the command line wins over the file.
    """
    from emulator.config import ConfigError, load_yaml_config

    defaults = build_parser().parse_args([section, *SOAK_REQUIRED_PLACEHOLDERS])
    for key, value in load_yaml_config(args.config, section).items():
        if key == "config" or not hasattr(args, key):
            raise ConfigError(f"config {args.config}: unknown {section} option {key!r}")
        if getattr(args, key) == getattr(defaults, key):
            current = getattr(defaults, key)
            setattr(args, key, type(current)(value) if isinstance(current, Path) else value)


# The soak's required flags, so the parser can tell a given option from its default.
SOAK_REQUIRED_PLACEHOLDERS = ["--devices", "0", "--duration", "0", "--embedded"]


def _cmd_soak(args: argparse.Namespace) -> int:
    from emulator import terminal
    from emulator.config import network_settings
    from emulator.interrupts import EXIT_INTERRUPTED, GracefulStop
    from emulator.net.peers import Peer
    from emulator.soak.display import LiveSummary, verdict_tables
    from emulator.soak.fleet import parse_mix
    from emulator.soak.processes import FleetEndpoints, ProcessFleet
    from emulator.soak.runner import SoakConfig
    from emulator.soak.verdict import SoakLimits

    stop = GracefulStop()
    if args.config:
        _apply_config_file(args, "soak")
    if args.tms and not args.archive:
        raise ValueError("--tms needs --archive")
    config = SoakConfig(
        devices=args.devices,
        duration_s=parse_duration(args.duration),
        mix=parse_mix(args.mix),
        fault_rate=args.fault_rate,
        tms=Peer.parse(args.tms) if args.tms else None,
        archive=Peer.parse(args.archive) if args.tms else None,
        data_dir=args.data_dir,
        time_scale=args.time_scale,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        spawn_rate=args.spawn_rate,
        watch_claimed_ups=not args.no_watch,
        max_associations=args.max_associations,
        station_prefix=args.station_prefix,
        edition=args.profile,
        uid_set=args.uids,
        device=args.device,
        drain_s=args.drain,
        admit_p95_s=args.admit_p95,
        seed=args.seed,
        network=network_settings(_tls_values(args)),
        limits=SoakLimits(
            p95_ms=args.max_p95_ms,
            p99_ms=args.max_p99_ms,
            rss_growth_mib=args.max_rss_growth_mib,
            rss_growth_mib_per_hour=args.max_rss_growth_mib_per_hour,
        ),
    )
    if not args.verbose:
        # An interruption is expected here (--fault-rate) and the verdict counts it; a
        # warning per UPS would bury the live summary.
        logging.getLogger("tdw.device").setLevel(logging.ERROR)
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    console = terminal.console()
    console.print(_tls_banner(config.network))
    values = {"metrics_port": args.metrics_port, "metrics_host": args.metrics_host}
    if args.locust:
        from emulator.soak import locustfile_path
        from emulator.soak.locust_launcher import LocustOptions, LocustSoak

        console.print(f"Locust users from {locustfile_path()}, {workers} local workers")
        options = LocustOptions(workers, args.locust_report, list(args.locust_arg))
        verdict = LocustSoak(config, options, _tls_values(args)).run()
        console.print(f"Locust reports in {args.locust_report}/ (locust.html, locust_*.csv)")
    elif workers > 0:
        fleet = ProcessFleet(
            config,
            workers,
            {**_tls_values(args), **_admission_values(args)},
            FleetEndpoints(
                args.metrics_host or "127.0.0.1", args.metrics_port, args.metrics_targets
            ),
        )
        console.print(
            f"{config.devices} devices in {len(fleet.shares)} worker processes"
            + (", the reference TMS and Archive in one more" if config.embedded else "")
        )
        if not config.embedded:  # what the external TMS's Archive must know
            for share, port in zip(fleet.shares, fleet.receiver_ports, strict=True):
                titles = " ".join(member.ae_title for member in share)
                console.print(f"devices receiving on {config.listen_host}:{port}: {titles}")
        stop.on_stop(fleet.stop)
        with stop.installed(), LiveSummary(console, config.duration_s) as live:
            verdict = fleet.run(on_progress=live)
    else:
        verdict = _soak_in_process(config, values, console, stop)
    for table in verdict_tables(verdict):
        console.print(table)
    print(f"verdict written to {verdict.write(args.json)}")
    for problem in verdict.problems:
        print(f"problem: {problem}", file=sys.stderr)
    for problem in verdict.records["problems"][:10]:
        print(f"  {problem}", file=sys.stderr)
    if stop.requested:
        left = int((verdict.tms or {}).get("in_progress", 0))
        print(
            f"stopped by {stop.signal_name}: every device ended the session it was in (an "
            "operator hold, its record stored) and returned its part of the verdict; "
            + (f"{left} UPS IN PROGRESS at the TMS" if left else "nothing left IN PROGRESS"),
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    print("PASS: nothing lost" if verdict.ok else "FAIL", flush=True)
    return 0 if verdict.ok else 1


def _cmd_locustfile(args: argparse.Namespace) -> int:
    from emulator.soak import locustfile_path

    print(locustfile_path())
    return 0


def _soak_in_process(config, values: dict, console, stop) -> Verdict:
    """The whole fleet, and the embedded site, in this one process."""
    from emulator.metrics import default_metrics
    from emulator.soak.display import LiveSummary
    from emulator.soak.runner import SoakRun

    metrics = default_metrics()
    run = SoakRun(config, metrics)
    server = _serve_metrics(values, metrics)
    try:
        if not config.embedded:
            console.print(f"every device receives on {config.listen_host}:{config.listen_port}")
            for member in run.fleet:
                console.print(f"device {member.ae_title} ({member.kind}) at {member.station}")
        stop.on_stop(run.stop)
        with stop.installed(), LiveSummary(console, config.duration_s) as live:
            return run.run(on_progress=live)
    finally:
        if server:
            server.stop()


def _cmd_hil(args: argparse.Namespace) -> int:
    import threading

    import serial

    from devices.link import SerialTransport
    from hil.controller_sim import ControllerSim, KeepOpen
    from hil.faults import ControlChannel, Faults

    if args.hil_command == "check":
        return _hil_check(args)
    faults = Faults()
    sim = ControllerSim(args.machine, args.time_scale, faults, frozenset(args.quirks))
    control = ControlChannel(
        faults,
        port=args.control_port,
        report=sim.report,
        commands={"place_patient": sim.place_patient},
    )
    print(f"control channel on {control.address[0]}:{control.address[1]}", flush=True)
    try:
        if args.tcp:
            host, _, port = args.tcp.rpartition(":")
            server = sim.listen_tcp(host or "127.0.0.1", int(port))
        elif args.serial != "auto":
            line = KeepOpen(SerialTransport(args.serial))
    except (OSError, ValueError, serial.SerialException) as exc:
        where = args.tcp or args.serial
        print(f"tdw-emu hil controller-sim: cannot open {where}: {exc}", file=sys.stderr)
        control.close()
        return 2
    if args.tcp:
        thread = threading.Thread(target=sim.serve_tcp, kwargs={"server": server}, daemon=True)
        thread.start()
        print(f"controller listening on tcp://{sim.address[0]}:{sim.address[1]}", flush=True)
    elif args.serial == "auto":
        master, path = sim.open_pty()
        thread = threading.Thread(target=sim.serve_pty, args=(master,), daemon=True)
        thread.start()
        print(f"controller listening on serial://{path}", flush=True)
    else:
        thread = threading.Thread(
            target=lambda: [sim.serve(line) for _ in iter(int, 1)], daemon=True
        )
        thread.start()
        print(f"controller listening on serial://{args.serial}", flush=True)
    try:
        _wait_for_signal()
    finally:
        control.close()
    return 0


def _hil_check(args: argparse.Namespace) -> int:
    from rich.table import Table

    from emulator import terminal
    from hil.check import ControllerCheck, write_junit

    check = ControllerCheck(args.device)
    known = [name for name, _, _ in check.checks()]
    unknown = [name for name in args.only if name not in known]
    if unknown:
        print(f"no check named {unknown[0]!r}; the checks are: {', '.join(known)}", file=sys.stderr)
        return 2
    results = check.run(args.only)
    table = Table(title=f"tdw-emu hil check {args.device}")
    for column in ("check", "PROTOCOL.md clause", "result", "detail"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, r.clause, "pass" if r.ok else "FAIL", r.detail[:90])
    terminal.console().print(table)
    if args.junit:
        print(f"JUnit written to {write_junit(results, args.junit, args.device)}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL {r.name}: PROTOCOL.md {r.clause}: {r.detail}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from emulator.demo import run_demo

    return run_demo(args.data_dir, args.interrupt, args.time_scale, args.kind)


def _cmd_scenarios(args: argparse.Namespace) -> int:
    from emulator.conformance.suite import load_scenarios

    if args.scenarios_action == "list":
        for scenario in load_scenarios():
            missing = ", its RT Plan missing from the Archive" if scenario.inputs_missing else ""
            if scenario.editions:
                missing += f" ({', '.join(scenario.editions)} only)"
            print(
                f"{scenario.name:32} station {scenario.station:18} "
                f"{scenario.sessions} session(s) today{missing}\n    {scenario.title}"
            )
        return 0
    import datetime as dt

    if args.scenarios_action == "prepare":
        return _prepare_kit(args)

    from emulator.config import network_settings
    from emulator.conformance.preflight import Preflight
    from emulator.conformance.reports import (
        print_summary,
        suite_ok,
        write_reports,
        write_setup_errors,
    )
    from emulator.conformance.scenarios import ScenarioRunner, SuiteConfig
    from emulator.net.peers import Peer
    from emulator.profile import load_profile

    if args.dimse_timeout is not None and not args.dimse_timeout > 0:
        raise ValueError(
            f"--dimse-timeout must be a positive number of seconds, not {args.dimse_timeout:g}"
        )
    devices = [Peer.parse(d) for d in args.device] or [
        Peer.parse("TDWEMU1@127.0.0.1:11130"),
        Peer.parse("TDWEMU2@127.0.0.1:11131"),
    ]
    config = SuiteConfig(
        tms=Peer.parse(args.tms),
        archive=Peer.parse(args.archive),
        devices=devices,
        edition=args.profile,
        uid_set=args.uids,
        data_dir=args.data_dir,
        network=network_settings(_tls_values(args)),
        listen_host=args.listen_host,
        dimse_timeout=args.dimse_timeout,
    )
    scenarios = load_scenarios(args.only, args.profile)
    started = dt.datetime.now().astimezone()
    meta = {
        "tool": f"tdw-emu {__version__}",
        "started": started.isoformat(timespec="seconds"),
        "tms": str(config.tms),
        "archive": str(config.archive),
        "devices": ", ".join(str(d) for d in devices),
        "profile": config.edition,
        "uids": config.uid_set,
        "tls": "on" if config.network.tls else "off",
    }
    problems = Preflight(
        config.tms,
        config.archive,
        devices,
        load_profile(config.edition, config.uid_set),
        config.network,
        config.listen_host,
    ).run(scenarios)
    if problems:
        for problem in problems:
            print(f"setup error: {problem}", file=sys.stderr)
        paths = write_setup_errors(problems, meta, args.report_dir)
        print(f"SETUP ERROR: the TMS was not judged ({len(problems)} problem(s)); exit 2")
        for name, path in paths.items():
            print(f"{name:8} {path}")
        return 2
    from emulator.interrupts import EXIT_INTERRUPTED, GracefulStop

    runner = ScenarioRunner(config)
    stop = GracefulStop()
    stop.on_stop(runner.stop)
    with stop.installed():
        try:
            results = runner.run(scenarios)
        finally:
            runner.close()
        paths = write_reports(results, runner.recorder, runner.book, meta, args.report_dir)
    print_summary(results)
    for name, path in paths.items():
        print(f"{name:8} {path}")
    if stop.requested:
        print(
            f"stopped by {stop.signal_name}: {len(results)} of {len(scenarios)} scenarios "
            "begun, the one interrupted not judged, every UPS the suite claimed ended; the "
            "reports above hold what ran",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0 if suite_ok(results) else 1


def _prepare_kit(args: argparse.Namespace) -> int:
    import datetime as dt

    from emulator.conformance.vendor_kit import KitRequest, write_kit
    from emulator.seeding import SOAK_PATIENTS, SeedOptions

    request = KitRequest(
        out=args.out,
        day=dt.date.fromisoformat(args.date) if args.date else dt.date.today(),
        tms_ae_title=args.tms_ae,
        archive_ae_title=args.archive_ae,
        edition=args.profile,
        uid_set=args.uids,
        seed_options=SOAK_PATIENTS if args.seed_size == "small" else SeedOptions(),
    )
    manifest = write_kit(request)
    for station in manifest["stations"]:
        ups = sum(len(s["ups"]) for s in station["sessions"])
        print(f"{station['station']:18} {station['scenario']:32} {ups} UPS")
    print(f"kit for {manifest['day']} written to {args.out} (see {args.out / 'README.md'})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import json

    from emulator.conformance.object_rules import appendix_a_findings, read_files
    from emulator.conformance.rulebook import RuleBook
    from emulator.profile import load_profile

    profile = load_profile(args.profile, args.uids)
    book = RuleBook.load(args.profile)
    objects, unreadable = read_files(args.files, profile.sop_classes)
    findings = appendix_a_findings(objects, book)
    for line in unreadable:
        print(f"unreadable: {line}")
    for f in findings:
        print(f"[{f.severity}] {f.rule}: {f.message}")
        print(f"    attribute {f.attribute or '-'}; {f.reason} ({f.reference}); {f.where}")
    failing = [f for f in findings if f.fails]
    print(
        f"{len(objects)} object(s), {len(findings)} finding(s), {len(failing)} error(s), "
        f"{len(unreadable)} unreadable"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "objects": len(objects),
                    "unreadable": unreadable,
                    "findings": [f.as_json() for f in findings],
                },
                indent=2,
            )
        )
    return 1 if failing or unreadable or not objects else 0


COMMANDS = {
    "seed": _cmd_seed,
    "archive": _cmd_archive,
    "tms": _cmd_tms,
    "run": _cmd_run,
    "hil": _cmd_hil,
    "demo": _cmd_demo,
    "scenarios": _cmd_scenarios,
    "validate": _cmd_validate,
    "soak": _cmd_soak,
    "locustfile": _cmd_locustfile,
    "watch": lambda args: cmd_watch(args, _tls_values(args)),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs a refused connection or a reset socket as an ERROR with a traceback;
    # the project says the same in one line of its own (with the retry it makes), so a user
    # sees pynetdicom's detail only when asking for it: -v its warnings, -vv everything.
    pynetdicom_level = {0: logging.CRITICAL, 1: logging.WARNING}.get(args.verbose)
    if pynetdicom_level is not None:
        logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
    from emulator.config import ConfigError
    from emulator.net.scu import AssociationFailed, AssociationRejected

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, AssociationRejected, AssociationFailed) as exc:
        # A set-up problem: one sentence with the cause and the fix; -v adds the traceback.
        if args.verbose:
            traceback.print_exc()
        command = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        print(f"tdw-emu {command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
