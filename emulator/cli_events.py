"""The command line of the event-driven workflow: ``tdw-emu watch`` and the operator's
``tdw-emu tms cancel`` and ``tdw-emu tms list`` (kept apart from ``cli.py``, which wires
them in)."""

from __future__ import annotations

import argparse
import sys

from emulator.config import network_settings
from emulator.net.peers import Peer
from emulator.net.scu import AssociationFailed, AssociationRejected, DimseError
from emulator.profile import load_profile

OPERATOR_AE = "OPERATOR"
CONSOLE_ACTIONS = ("cancel", "list")


def add_console_flags(actions: argparse._SubParsersAction, add_tls_flags) -> None:
    """``tdw-emu tms cancel UID`` and ``tdw-emu tms list``: a running TMS, over DICOM."""
    cancel = actions.add_parser(
        "cancel",
        help="ask the performer of a UPS to stop (N-ACTION Request Cancel)",
    )
    cancel.add_argument("uid", help="the UPS SOP Instance UID (tdw-emu tms list shows them)")
    cancel.add_argument("--reason", default="canceled by the operator", help="why")
    cancel.add_argument(
        "--force",
        action="store_true",
        help="the performer is gone: the reference TMS ends the IN PROGRESS UPS CANCELED "
        "itself (PS3.4 CC.2.1.3), from --calling-ae OPERATOR",
    )
    listing = actions.add_parser(
        "list",
        help="list the UPS a running TMS holds (C-FIND)",
    )
    listing.add_argument("--station", help="only this station's UPS")
    listing.add_argument(
        "--state",
        choices=("SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"),
        help="only UPS in this state",
    )
    listing.add_argument(
        "--uids-only", action="store_true", help="print the SOP Instance UIDs alone, one a line"
    )
    for p in (cancel, listing):
        p.add_argument("--tms", metavar="AET@HOST:PORT", help="required: the running TMS")
        p.add_argument("--calling-ae", default=OPERATOR_AE, help="this console's AE title")
        p.add_argument(
            "--profile",
            choices=("ihe-ro-2008", "tdw-ii"),
            help="profile edition (default: ihe-ro-2008)",
        )
        p.add_argument("--uids", choices=("final", "trial"), help="UID set (default: final)")
        add_tls_flags(p)


def cmd_tms_console(args: argparse.Namespace, tls: dict) -> int:
    from rich.table import Table

    from emulator import terminal
    from emulator.reference.console import list_ups, request_cancel

    if not args.tms:
        raise ValueError(f"tms {args.action} needs --tms AET@HOST:PORT")
    tms = Peer.parse(args.tms)
    profile = load_profile(args.profile or "ihe-ro-2008", args.uids or "final")
    network = network_settings(tls)
    try:
        if args.action == "cancel":
            if not args.uid:
                raise ValueError("tms cancel needs the UPS SOP Instance UID")
            status, comment = request_cancel(
                tms, args.calling_ae, args.uid, args.reason, profile, network, args.force
            )
            forced = " (forced: the performer is gone, PS3.4 CC.2.1.3)" if args.force else ""
            print(f"Request Cancel {args.uid}{forced}: 0x{status:04X} {comment}".rstrip())
            return 0 if status == 0x0000 or status & 0xF000 == 0xB000 else 1
        found = list_ups(tms, args.calling_ae, profile, args.station or "", network)
        if args.state:
            found = [ups for ups in found if ups.get("ProcedureStepState") == args.state]
    except (AssociationRejected, AssociationFailed):
        raise  # a set-up problem: main() says it in one sentence and exits 2
    except DimseError as exc:
        print(f"tdw-emu tms {args.action}: {exc}", file=sys.stderr)
        return 1
    if args.uids_only:
        for ups in found:
            print(str(ups.get("SOPInstanceUID", "")))
        return 0
    table = Table(title=f"UPS at {tms}")
    for column in ("SOP Instance UID", "station", "label", "state", "patient"):
        table.add_column(column)
    for ups in found:
        station = (ups.get("ScheduledStationNameCodeSequence") or [None])[0]
        table.add_row(
            str(ups.get("SOPInstanceUID", "")),
            str(station.CodeValue) if station is not None else "",
            str(ups.get("ProcedureStepLabel", "")),
            str(ups.get("ProcedureStepState", "")),
            str(ups.get("PatientID", "")),
        )
    terminal.console().print(table)
    return 0


def add_watch(sub: argparse._SubParsersAction, add_tls_flags) -> None:
    p = sub.add_parser(
        "watch", help="subscribe to a TMS's UPS events and print them as they come (a PPVS)"
    )
    p.add_argument("--tms", metavar="AET@HOST:PORT", required=True)
    p.add_argument(
        "--listen",
        metavar="AET@HOST:PORT",
        default="TDWWATCH@127.0.0.1:11140",
        help="this watcher's AE title and where the TMS sends events (the TMS must know it "
        "as a peer)",
    )
    p.add_argument("--listen-host", help="address to bind, when not the --listen host")
    p.add_argument("--ups", default="", help="one UPS SOP Instance UID (default: all, global)")
    p.add_argument(
        "--lock",
        action="store_true",
        help="subscribe with a deletion lock: a global one then reports every UPS the TMS "
        "holds at once (PS3.4 Table CC.2.3-2); released on the way out",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event and line")
    p.add_argument(
        "--until",
        metavar="KEY=VALUE[,...]",
        help="stop once an event matches, e.g. event=ups_state_report,state=COMPLETED "
        "(keys: event, state, ups, type)",
    )
    p.add_argument("--count", type=int, default=1, help="how many matching events")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    p.add_argument("--profile", choices=("ihe-ro-2008", "tdw-ii"), default="ihe-ro-2008")
    p.add_argument("--uids", choices=("final", "trial"), default="final")
    add_tls_flags(p)


def cmd_watch(args: argparse.Namespace, tls: dict) -> int:
    from emulator import terminal
    from emulator.watcher import Condition, WatchConfig, Watcher, json_line

    config = WatchConfig(
        tms=Peer.parse(args.tms),
        listen=Peer.parse(args.listen),
        profile=load_profile(args.profile, args.uids),
        network=network_settings(tls),
        ups=args.ups,
        deletion_lock=args.lock,
        until=Condition.parse(args.until) if args.until else None,
        count=args.count,
        timeout_s=args.timeout,
        listen_host=args.listen_host,
    )
    console = terminal.console()

    def show(row: dict) -> None:
        if args.json:
            print(json_line(row), flush=True)
            return
        detail = " ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("time", "type", "event", "ups")
        )
        console.print(f"{row['time'][11:]}  {row['event']:<22} {row['ups']}  {detail}")

    def subscribed(text: str) -> None:
        print(f"tdw-emu watch: {text}", file=sys.stderr, flush=True)

    try:
        code = Watcher(config).run(show, subscribed)
    except DimseError as exc:
        print(f"tdw-emu watch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    if code == 1:
        print("tdw-emu watch: timed out before the --until condition", file=sys.stderr)
    return code
