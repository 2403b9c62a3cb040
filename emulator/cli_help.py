"""What each ``tdw-emu`` command's ``--help`` says about it: one paragraph, and an example
that works as written after the commands before it in README.md (tests/test_cli_help.py
runs ``--help`` of each and checks both are there)."""

from __future__ import annotations

import argparse

# (description, example) by command path.
HELP: dict[str, tuple[str, str]] = {
    "seed": (
        "Writes synthetic RT patients as DICOM files, one directory each: a phantom CT, an RT "
        "Structure Set (EXTERNAL, PTV, ISOCENTER), an RT Plan with STATIC and DYNAMIC photon "
        "beams, an RT Dose and an RT Beams Delivery Instruction, all valid under dciodvfy and "
        "the seed's Appendix A. With --kind afterloader: an HDR brachytherapy patient instead "
        "(a CT with catheters, CTV and organs at risk, an RT Plan with Ir-192 channels and "
        "dwells for the simulated afterloader's source today, its dose). It prints each "
        "patient's ID, study and RT Plan UID: what 'tdw-emu tms schedule' and a TMS under "
        "test need.",
        "tdw-emu seed --out seed-data --patients 2 --beams 4",
    ),
    "archive": (
        "Serves the reference Archive alone: Storage SCP for every SOP class the seed's "
        "tables name, Study Root C-FIND and C-MOVE SCP, a durable SQLite and file store. Only "
        "--peer AE titles (also C-MOVE destinations) and --allow AE titles may call. It prints "
        "its address and runs until interrupted.",
        "tdw-emu archive --data-dir archive-data --port 11112 --peer PDS1@127.0.0.1:11113 "
        "--import seed-data",
    ),
    "tms": (
        "Serves the reference TMS (a strict UPS SCP: the PS3.4 state table, Transaction UID "
        "rules, final-state checks) and its Archive in one process, on loopback unless --host "
        "says otherwise. It prints each AE's address, then 'ready', and runs until "
        "interrupted. Only the AE titles named by --peer (C-MOVE destinations) and --allow "
        "may call. 'tdw-emu tms schedule --help', 'tms list --help' and 'tms cancel --help' "
        "describe its other actions.",
        "tdw-emu tms --data-dir site --peer PDS1@127.0.0.1:11113 --seed LINAC1",
    ),
    "tms schedule": (
        "Schedules one treatment session (four UPS, RO-17) per weekday (--weekends: per day) "
        "for the plan's "
        "fractions at STATION, in the UPS store under --data-dir; a TMS serving that "
        "directory offers them at its next worklist query. The plan comes from the Archive "
        "under --data-dir: --plan-uid names it, or --patient-id picks that patient's plan, or, "
        "if the Archive holds one plan, that one. Nothing listens.",
        "tdw-emu tms schedule --data-dir site --station LINAC1 --fractions 5",
    ),
    "tms list": (
        "Queries a running TMS's worklist (UPS C-FIND, any state) and prints each UPS's SOP "
        "Instance UID, station, label, state and patient. The TMS must allow --calling-ae.",
        "tdw-emu tms list --tms TMS@127.0.0.1:11114 --station LINAC1",
    ),
    "tms cancel": (
        "Sends N-ACTION Request Cancel (PS3.4 CC.2.2) for one UPS to a running TMS, as an "
        "operator's console would; the TMS tells the performer, which cancels the UPS itself. "
        "Exit 0 if the TMS accepted the request.",
        'tdw-emu tms cancel UID --tms TMS@127.0.0.1:11114 --reason "patient moved"',
    ),
    "run": (
        "Runs one emulated performing device (PPS, PDS, TDD, or an HDR afterloader) against a "
        "TMS and its Archive: "
        "worklist (RO-17), retrieve (RO-18, RO-20), claim (RO-19), progress (RO-26), the work "
        "on a simulated machine or a real controller (--device), results stored (RO-22 to "
        "RO-24), final update (RO-21) and COMPLETED or CANCELED (RO-25). The TMS and the "
        "Archive must know --ae-title at --listen-port. Exit 0 only if every session ran as "
        "intended; 1 with a 'problem:' line per UPS that did not; 2 on a set-up problem.",
        "tdw-emu run --kind pds --station LINAC1 --tms TMS@127.0.0.1:11114 "
        "--archive ARCHIVE@127.0.0.1:11112 --ae-title PDS1 --listen-port 11113",
    ),
    "hil": (
        "Tools for a bench rig: a simulated treatment-machine controller speaking "
        "hil/PROTOCOL.md on a pty or TCP, and a checker for a real controller.",
        "tdw-emu hil controller-sim --serial auto",
    ),
    "hil controller-sim": (
        "Serves a simulated treatment-machine controller on a real pty pair ('auto') or a TCP "
        "port, speaking hil/PROTOCOL.md at --time-scale, with a JSON-lines fault-injection "
        "channel on --control-port. It prints the URL to give 'tdw-emu run --device'.",
        "tdw-emu hil controller-sim --tcp 127.0.0.1:9000 --control-port 9001",
    ),
    "hil check": (
        "Runs the protocol's checks against a controller (handshake, every message type, NAK "
        "and retransmission, heartbeat, answers while moving, interrupt during a beam, "
        "reconnect with last_delivery) and prints a pass/fail table citing the PROTOCOL.md "
        "clause of each. Exit 0 only if every check passes.",
        "tdw-emu hil check --device serial:///dev/ttyUSB0?baudrate=57600 --junit hil.xml",
    ),
    "demo": (
        "Starts the embedded reference TMS and Archive, seeds a patient and runs a PDS "
        "through the fraction with a live bar per beam (--kind afterloader: an HDR fraction, "
        "a bar per channel in seconds). With --interrupt an interlock trips there (for an "
        "afterloader CHANNEL:SECONDS, the door), the TMS schedules the CONTINUATION and the "
        "device delivers exactly the rest. With --data-dir the treatment records are left in "
        "DIR/records.",
        "tdw-emu demo --interrupt 2:40",
    ),
    "scenarios": (
        "The conformance suite that judges a TMS and its Archive: 'list' the scenarios, "
        "'prepare' the kit the TMS under test loads, 'run' them and write the reports.",
        "tdw-emu scenarios list",
    ),
    "scenarios list": (
        "Prints each scenario, the station it uses and what the TMS must hold for it.",
        "tdw-emu scenarios list",
    ),
    "scenarios prepare": (
        "Writes the kit a TMS under test loads before the suite: patient data, every UPS as "
        "N-CREATE DICOM JSON per station, the day window and the plan constraints "
        "(README.md in the kit).",
        "tdw-emu scenarios prepare --out kit --tms-ae VENDORTMS --archive-ae VENDORPACS",
    ),
    "scenarios run": (
        "Runs the scenarios against a TMS and its Archive: a pre-flight (exit 2 on a set-up "
        "problem), each scenario with emulated devices, rule checks on every message "
        "received, and JSON, JUnit, HTML and DIMSE-traffic reports. Exit 1 on any "
        "non-conformance.",
        "tdw-emu scenarios run --tms TMS@127.0.0.1:11114 --archive ARCHIVE@127.0.0.1:11112",
    ),
    "validate": (
        "Applies the seed's Appendix A rules to DICOM files at rest and prints each finding "
        "with the rule, the attribute and the reference. Exit 1 on any error.",
        "tdw-emu validate seed-data",
    ),
    "soak": (
        "Runs many emulated devices at once (in --workers processes), against the embedded "
        "reference TMS (--embedded) or another TMS, with a live summary, then a verdict: "
        "sessions, continuations, records against delivered beams (lost must be 0), DIMSE "
        "latency and memory growth, on screen and as JSON. Exit 0 only if nothing was lost, "
        "no session failed, nothing was left IN PROGRESS and every --max-* limit held.",
        "tdw-emu soak --embedded --devices 20 --duration 2m --metrics-port 9470",
    ),
    "watch": (
        "Subscribes to a TMS's UPS events (UPS Watch, PS3.4 CC.2.3) and prints them as they "
        "come, as a progress viewer or a dashboard sees them; --until ends it on an event, "
        "for CI. The TMS must allow the --listen AE title and send events to it.",
        "tdw-emu watch --tms TMS@127.0.0.1:11114 --listen TDWWATCH@127.0.0.1:11140",
    ),
    "locustfile": (
        "Prints the path of the packaged locustfile, so 'locust -f' finds it on any machine "
        "where tdw-emulator is installed (docs/locust.md).",
        'locust -f "$(tdw-emu locustfile)" --worker --master-host 10.0.0.10',
    ),
}


def subcommands(parser: argparse.ArgumentParser, path: str = ""):
    """Every (command path, parser) below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                child_path = f"{path} {name}".strip()
                yield child_path, child
                yield from subcommands(child, child_path)


def describe(parser: argparse.ArgumentParser) -> None:
    """Gives each subcommand its paragraph and example from HELP."""
    for path, child in subcommands(parser):
        description, example = HELP[path]
        child.description = description
        child.epilog = f"example:\n  {example}"


def reference(parser: argparse.ArgumentParser) -> str:
    """docs/cli.md: every command's --help, as a person at a 100-column terminal sees it.

    Written by ``make cli-docs``; tests/test_cli_help.py fails when it is not current, so
    the flags the docs list are always every flag there is."""
    import os

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parts = [
            "# tdw-emu command reference\n\n"
            "Every command's `--help`, generated (`make cli-docs`); README.md shows how they "
            "fit together.\n",
            f"## tdw-emu\n\n```text\n{parser.format_help()}```\n",
        ]
        for path, child in subcommands(parser):
            parts.append(f"## tdw-emu {path}\n\n```text\n{child.format_help()}```\n")
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


if __name__ == "__main__":
    from emulator.cli import build_parser

    print(reference(build_parser()), end="")
