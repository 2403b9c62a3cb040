"""Mutation testing of the standard's tables: does some test fail when a table is wrong?

Each mutant is one change to one file of ``profiles/`` (ups.yaml, ups_attributes.yaml,
rules.yaml, scenarios.yaml): a deleted rule or scenario; a flipped status (in the state
tables, in a scenario's expectation); a dropped required attribute (a final-state
requirement, an RO-17 return key) or one allowed where the standard forbids it. The
runner copies the project to a scratch directory, applies the mutant there, and runs the
tests that judge that table, stopping at the first failure. A mutant is killed when a test
fails; it survives when every test passes. Prints each survivor and the score (mutants
killed out of mutants made).

    .venv/bin/python benchmarks/mutation.py [--jobs 2] [--only rules.yaml] [--list]

The tables are mutated as data (loaded, changed, dumped), not as text: what is tested is
whether the product reads the table whole and whether the tests notice a wrong entry.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "test-artifacts",
    "*.egg-info",
)

# The tests that judge each table, fastest first (a run stops at the first failure).
JUDGES = {
    "ups.yaml": [
        "tests/test_tms_ups.py",
        "tests/test_strict_tms.py",
        "tests/test_final_transition.py",
    ],
    "ups_attributes.yaml": [
        "tests/test_ups_attribute_table.py",
        "tests/test_tms_ups.py",
        "tests/test_strict_tms.py",
        "tests/test_final_transition.py",
    ],
    "rules.yaml": [
        "tests/test_profiles.py",
        "tests/test_conformance_validate.py",
        "tests/test_conformance_traffic.py",
        "tests/test_conformance_scenarios.py",
    ],
    "scenarios.yaml": [
        "tests/test_profiles.py",
        "tests/test_conformance_scenarios.py",
    ],
}


@dataclass(frozen=True)
class Mutant:
    """One change to one table: ``apply`` edits the loaded YAML in place."""

    table: str
    name: str
    apply: Callable[[Any], None]


def _flip(status: int) -> int:
    """Success becomes a failure and any other status becomes success."""
    return 0xC300 if status == 0 else 0x0000


def _status_leaves(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths of every integer that is a DIMSE status (a key named status, or 0x0000-0xFFFF
    under a state table)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _status_leaves(value, (*path, key))
    elif isinstance(node, int) and not isinstance(node, bool) and path:
        yield path


def _at(data: Any, path: tuple) -> tuple[Any, Any]:
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    return parent, path[-1]


def _set(path: tuple, make: Callable[[Any], Any]) -> Callable[[Any], None]:
    def apply(data: Any) -> None:
        parent, key = _at(data, path)
        parent[key] = make(parent[key])

    return apply


def _delete(path: tuple) -> Callable[[Any], None]:
    def apply(data: Any) -> None:
        parent, key = _at(data, path)
        del parent[key]

    return apply


def ups_mutants(data: dict) -> Iterator[Mutant]:
    for section in ("change_state", "n_set", "request_cancel"):
        for path in _status_leaves(data[section], (section,)):
            parent, key = _at(data, path)
            if path[-1] in ("status",) or (isinstance(parent, dict) and key != "reference"):
                label = "/".join(str(p) for p in path)
                yield Mutant("ups.yaml", f"flip {label}", _set(path, _flip))
    for requested in ("COMPLETED", "CANCELED"):
        path = ("change_state", requested, "IN PROGRESS", "requires")
        yield Mutant("ups.yaml", f"drop {'/'.join(path)}", _delete(path))


def _attribute_rows(data: dict) -> Iterator[tuple[tuple, dict]]:
    def walk(rows: list, path: tuple) -> Iterator[tuple[tuple, dict]]:
        for index, row in enumerate(rows):
            yield (*path, index), row
            if row.get("items"):
                yield from walk(row["items"], (*path, index, "items"))

    for m, module in enumerate(data["modules"]):
        yield from walk(module["attributes"], ("modules", m, "attributes"))


def attribute_mutants(data: dict) -> Iterator[Mutant]:
    for path, row in _attribute_rows(data):
        if row.get("final") not in (None, "O"):
            yield Mutant(
                "ups_attributes.yaml",
                f"drop final-state {row['final']} of {row['keyword']}",
                _set((*path, "final"), lambda _: "O"),
            )
        if row.get("n_set") == "Not allowed":
            yield Mutant(
                "ups_attributes.yaml",
                f"allow N-SET of {row['keyword']}",
                _set((*path, "n_set"), lambda _: "3/3"),
            )


def rule_mutants(data: dict) -> Iterator[Mutant]:
    for index, rule in enumerate(data["rules"]):
        yield Mutant("rules.yaml", f"delete rule {rule['id']}", _delete(("rules", index)))
    for index, key in enumerate(data["ro17_return_keys"]):
        yield Mutant(
            "rules.yaml",
            f"drop RO-17 return key {key['path']}",
            _delete(("ro17_return_keys", index)),
        )


def scenario_mutants(data: dict) -> Iterator[Mutant]:
    for s, scenario in enumerate(data["scenarios"]):
        name = scenario["name"]
        yield Mutant("scenarios.yaml", f"delete scenario {name}", _delete(("scenarios", s)))
        for t, step in enumerate(scenario["steps"]):
            expect = step.get("expect") or {}
            for key in ("status", "losers_status"):
                value = expect.get(key)
                if isinstance(value, int):
                    path = ("scenarios", s, "steps", t, "expect", key)
                    yield Mutant(
                        "scenarios.yaml", f"flip {name} step {t + 1} {key}", _set(path, _flip)
                    )


GENERATORS = {
    "ups.yaml": ups_mutants,
    "ups_attributes.yaml": attribute_mutants,
    "rules.yaml": rule_mutants,
    "scenarios.yaml": scenario_mutants,
}


def mutants(only: list[str] | None = None) -> list[Mutant]:
    made = []
    for table, generate in GENERATORS.items():
        if only and table not in only:
            continue
        data = yaml.safe_load((REPO / "profiles" / table).read_text(encoding="utf-8"))
        made.extend(generate(data))
    return made


@dataclass
class Verdict:
    mutant: Mutant
    killed: bool
    by: str
    seconds: float


def run_mutant(mutant: Mutant, scratch: Path) -> Verdict:
    """Copies the project, applies the mutant, runs the table's judges until one fails."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mutant-", dir=scratch))
    try:
        shutil.copytree(REPO, work / "repo", ignore=COPY_IGNORE)
        table = work / "repo" / "profiles" / mutant.table
        data = yaml.safe_load(table.read_text(encoding="utf-8"))
        changed = copy.deepcopy(data)
        mutant.apply(changed)
        if changed == data:
            raise RuntimeError(f"mutant {mutant.name!r} changed nothing")
        table.write_text(yaml.safe_dump(changed, sort_keys=False), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(work / "repo"), "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTEST_ADDOPTS", None)
        for judge in JUDGES[mutant.table]:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-x",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-o",
                    "addopts=",
                    "--timeout=600",
                    judge,
                ],
                cwd=work / "repo",
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if result.returncode not in (0, 5):
                failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
                by = failed[0].removeprefix("FAILED ").split(" - ")[0] if failed else judge
                return Verdict(mutant, True, by, time.monotonic() - started)
        return Verdict(mutant, False, "", time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--only", action="append", choices=sorted(GENERATORS), help="tables")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--name", action="append", help="only mutants whose name contains this (repeatable)"
    )
    args = parser.parse_args(argv)
    made = mutants(args.only)
    if args.name:
        made = [m for m in made if any(part in m.name for part in args.name)]
    if args.list:
        for mutant in made:
            print(f"{mutant.table:20} {mutant.name}")
        print(f"{len(made)} mutants")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="tdw-mutation-"))
    verdicts: list[Verdict] = []
    started = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        for verdict in pool.map(lambda m: run_mutant(m, scratch), made):
            verdicts.append(verdict)
            mark = "killed  " if verdict.killed else "SURVIVED"
            print(
                f"{mark} {verdict.mutant.table:20} {verdict.mutant.name:60} "
                f"{verdict.seconds:6.1f} s  {verdict.by}",
                flush=True,
            )
    shutil.rmtree(scratch, ignore_errors=True)
    killed = sum(v.killed for v in verdicts)
    survivors = [v for v in verdicts if not v.killed]
    print()
    for table in GENERATORS:
        of_table = [v for v in verdicts if v.mutant.table == table]
        if of_table:
            print(f"{table:20} {sum(v.killed for v in of_table):4} of {len(of_table):4} killed")
    for verdict in survivors:
        print(f"survivor: {verdict.mutant.table}: {verdict.mutant.name}")
    score = killed / len(verdicts) * 100 if verdicts else 0.0
    print(
        f"mutation score: {killed} of {len(verdicts)} mutants killed ({score:.1f} %) "
        f"in {time.monotonic() - started:.0f} s"
    )
    return 0 if score >= 95.0 else 1


if __name__ == "__main__":
    sys.exit(main())
