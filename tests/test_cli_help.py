"""What a new user meets first: each command's --help (a paragraph, an example that parses,
defaults shown), `tms schedule` on its own, and tables that stay whole when piped."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from rich.table import Table

from emulator import terminal
from emulator.cli import build_parser
from emulator.cli_help import HELP, subcommands
from emulator.reference.site import ReferenceSite, SiteConfig
from tests.conftest import REPO


def _tdw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_command_has_a_paragraph_and_an_example_that_parses():
    paths = [path for path, _ in subcommands(build_parser())]
    assert sorted(paths) == sorted(HELP), "a command without help text, or text for none"
    for path, parser in subcommands(build_parser()):
        text = parser.format_help()
        description, example = HELP[path]
        assert " ".join(description.split()[:6]) in " ".join(text.split()), path
        assert f"example:\n  {example}" in text, path
        words = shlex.split(example)
        if words[0] == "tdw-emu":  # the locustfile's example is locust's command line
            build_parser().parse_args(words[1:])  # SystemExit (exit 2) fails the test


def test_tms_schedule_has_its_own_help():
    result = _tdw("tms", "schedule", "--help")
    assert result.returncode == 0, result.stderr
    assert "--plan-uid" in result.stdout and "--patient-id" in result.stdout
    # Not the server's options: they play no part in scheduling.
    for serving in ("--seed-scenarios", "--peer", "--allow", "--tls-cert", "--max-associations"):
        assert serving not in result.stdout, serving


def test_tms_schedule_takes_the_plan_from_the_archive(tmp_path):
    """No caller need be allowed (nothing listens); with no --plan-uid the Archive's only
    plan, or --patient-id's, is scheduled; none or several is one sentence, exit 2."""
    nowhere = _tdw("tms", "schedule", "--data-dir", str(tmp_path / "nowhere"), "--station", "X")
    assert nowhere.returncode == 2 and "holds no TMS" in nowhere.stderr
    assert not (tmp_path / "nowhere").exists()
    ReferenceSite(SiteConfig(data_dir=tmp_path / "empty", accept_any_ae=True)).stop()
    empty = _tdw("tms", "schedule", "--data-dir", str(tmp_path / "empty"), "--station", "X")
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert empty.stderr.count("\n") == 1 and "Traceback" not in empty.stderr
    assert "holds no RT Plan" in empty.stderr and "--import" in empty.stderr

    site = ReferenceSite(SiteConfig(data_dir=tmp_path / "site", accept_any_ae=True))
    try:
        site.seed("LINAC1", 1)
        site.seed("LINAC1", 2)
        plans = {p.values["patient_id"]: p.sop_instance_uid for p in site.archive.store.select(
            "modality = 'RTPLAN'")}  # fmt: skip
    finally:
        site.stop()
    assert len(plans) == 2
    several = _tdw("tms", "schedule", "--data-dir", str(tmp_path / "site"), "--station", "L2")
    assert several.returncode == 2, several.stdout + several.stderr
    assert "holds 2 RT Plans" in several.stderr and "Traceback" not in several.stderr
    assert all(uid in several.stderr for uid in plans.values())

    patient, plan_uid = sorted(plans.items())[1]
    chosen = _tdw(
        "tms", "schedule", "--data-dir", str(tmp_path / "site"), "--station", "L2",
        "--patient-id", patient, "--fractions", "2", "--start", "203001070800",
    )  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.count(f"at L2 (plan {plan_uid})") == 2

    bad_start = _tdw(
        "tms", "schedule", "--data-dir", str(tmp_path / "site"), "--station", "L2",
        "--patient-id", patient, "--start", "tomorrow",
    )  # fmt: skip
    assert bad_start.returncode == 2 and "is not YYYYMMDDHHMM" in bad_start.stderr


@pytest.mark.parametrize("columns", [None, "60"])
def test_a_piped_table_keeps_each_row_on_one_line(monkeypatch, capsys, columns):
    label = "Fx 1 RT Patient Position Acquisition, CT kV"
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    table = Table()
    for name in ("UPS", "step", "state", "delivered MU", "stored", "reason"):
        table.add_column(name)
    table.add_row(label, "acquisition", "COMPLETED", "", "1", "the device restarted while")
    terminal.console().print(table)
    lines = capsys.readouterr().out.splitlines()
    # Piped (pytest captures stdout), a row is one line; COLUMNS set by the user still wins.
    assert any(label in line for line in lines) is (columns is None), lines


def test_docs_cli_md_is_every_commands_help():
    """docs/cli.md lists every flag of every command because it is their --help. Made in a
    process of its own, as `make cli-docs` does: a backend another test registered in this
    one would show in `run --device`'s list."""
    made = subprocess.run(
        [sys.executable, "-m", "emulator.cli_help"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    written = (REPO / "docs" / "cli.md").read_text()
    assert written == made.stdout, "docs/cli.md is stale: run make cli-docs"


def _option_help(parser, action) -> str:
    """An option's help as --help prints it (defaults filled in), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def test_every_option_says_its_default_once_and_every_required_one_is_marked():
    """README promises every option with its default: each option with a value for a
    default says it exactly once (never '(default: )'), and each required one says so."""
    import argparse

    problems = []
    for path, child in subcommands(build_parser()):
        for action in child._actions:
            if not action.option_strings or isinstance(
                action, argparse._HelpAction | argparse._VersionAction
            ):
                continue
            text = _option_help(child, action)
            name = f"tdw-emu {path} {action.option_strings[-1]}"
            if not text:
                problems.append(f"{name}: no description")
            if text.count("default") > 1:
                problems.append(f"{name}: says its default more than once: {text!r}")
            if "(default: )" in text:
                problems.append(f"{name}: an empty default: {text!r}")
            if action.default not in (None, False, [], "", argparse.SUPPRESS) and (
                "default" not in text
            ):
                problems.append(f"{name}: its default {action.default!r} is not said")
            if action.required and "required" not in text:
                problems.append(f"{name}: required, not marked")
    assert problems == []


@pytest.mark.parametrize(
    ("command", "option", "said"),
    [
        ("tms", "--port", "11114"),
        ("tms", "--archive-port", "11112"),
        ("tms", "--ae-title", "TMS"),
        ("archive", "--port", "11112"),
        ("archive", "--data-dir", "required"),
        ("run", "--data-dir", "XDG_STATE_HOME"),
    ],
)
def test_defaults_the_configuration_applies_are_said_too(command, option, said):
    """Options whose default comes from the YAML-merging config (argparse's is None)."""
    parser = dict(subcommands(build_parser()))[command]
    (action,) = [a for a in parser._actions if option in a.option_strings]
    assert said in _option_help(parser, action)
